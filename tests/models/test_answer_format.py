"""Answer formats and how answers are read: the letter format, the option format (the option's text
then its letter) and likelihood scoring of the options (one prompt pass, its KV cache repeated)."""

import numpy as np
import pytest
import torch

from rgpt4d.models.tokenizer import answer_ids, encode_batch, special_token_ids
from tests.models.conftest import T, make_batch, make_student

PROMPTS = ["How tall is <obj_1>?\n(A) 1 m\n(B) 2.5 m", "Is <obj_2> left of <obj_1>?\n(A) yes\n(B) no\n(C) It never stops."]
OPTIONS = [["1 m", "2.5 m"], ["yes", "no", "It never stops."]]


def _enc(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_answer_ids_per_format(tokenizer):
    eos = special_token_ids(tokenizer)["eos"]
    ids, n = answer_ids(tokenizer, "letter", "B", "2.5 m")
    assert ids == _enc(tokenizer, "B") + [eos] and n == 0
    ids, n = answer_ids(tokenizer, "option", "B", "2.5 m")
    text = _enc(tokenizer, "2.5 m")
    assert n == len(text) and ids[:n] == text and ids[-1] == eos
    assert tokenizer.decode(ids, skip_special_tokens=True) == "2.5 m (B)"
    with pytest.raises(ValueError, match="answer_format: must be one of"):
        answer_ids(tokenizer, "value", "B", "2.5 m")
    with pytest.raises(ValueError, match="letter: expected one of"):
        answer_ids(tokenizer, "option", "Z", "2.5 m")
    with pytest.raises(ValueError, match="option: the option text for \\(A\\) is empty"):
        answer_ids(tokenizer, "option", "A", "")


def test_labels_cover_the_whole_option_answer(tokenizer):
    targets = [answer_ids(tokenizer, "option", "B", "2.5 m")[0], answer_ids(tokenizer, "option", "C",
                                                                            "It never stops.")[0]]
    enc = encode_batch(tokenizer, PROMPTS, 4, targets)
    for row, t in zip(enc["labels"], targets):
        assert row[row != -100].tolist() == t
    with pytest.raises(ValueError, match="answers: answer 0 has no tokens"):
        encode_batch(tokenizer, PROMPTS[:1], 4, [[]])


def test_batch_to_inputs_uses_the_config_format(tokenizer):
    from rgpt4d.train.inputs import batch_to_inputs

    batch = dict(prompt=PROMPTS, answer_index=torch.tensor([1, 2]), options=OPTIONS,
                 frames=torch.zeros(2, T, 3, 32, 32, dtype=torch.uint8), timestamps=torch.arange(T).float()[None].repeat(2, 1))
    for fmt, expected in (("letter", ["B", "C"]), ("option", ["2.5 m (B)", "It never stops. (C)"])):
        cfg = make_student(tokenizer, answer_format=fmt).config
        lab = batch_to_inputs(batch, tokenizer, cfg)["labels"]
        got = [tokenizer.decode(r[r != -100].tolist(), skip_special_tokens=True) for r in lab]
        assert got == expected
    with pytest.raises(ValueError, match="answer_format must be one of"):
        make_student(tokenizer, answer_format="value")


def _brute_force(student, tokenizer, batch, b, option):
    """log p(option | prompt b) from one teacher-forced forward over prompt + option."""
    enc = encode_batch(tokenizer, [PROMPTS[b]], student.config.num_visual_tokens, [option],
                       restate=student.config.restate_mode())
    rest = {k: v[b:b + 1] for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        logp = student(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **rest).logits[0]
    logp = logp.double().log_softmax(-1)
    ids, L, n = enc["input_ids"][0], enc["input_ids"].shape[1], len(option)
    return sum(float(logp[L - n - 1 + t, ids[L - n + t]]) for t in range(n))


def test_option_log_likelihoods_equal_teacher_forcing(tokenizer):
    student = make_student(tokenizer).eval()
    batch = make_batch(tokenizer, student.config, answers=None, prompts=PROMPTS)
    options = [[_enc(tokenizer, o) for o in opts] for opts in OPTIONS]
    scores = student.option_log_likelihoods(options=options, **batch)
    assert scores.shape == (2, 3) and scores.dtype == torch.float32
    assert scores[0, 2] == float("-inf")  # prompt 0 has two options
    for b, opts in enumerate(options):
        for k, o in enumerate(opts):
            assert float(scores[b, k]) == pytest.approx(_brute_force(student, tokenizer, batch, b, o), abs=1e-4)
    with pytest.raises(ValueError, match="options: 1 option lists for a batch of 2"):
        student.option_log_likelihoods(options=options[:1], **batch)
    with pytest.raises(ValueError, match="options: prompt 1 needs at least one option"):
        student.option_log_likelihoods(options=[options[0], [[]]], **batch)


def _train(student, batch, steps=30):
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(steps):
        loss = student(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return student.eval()


@pytest.fixture(scope="module")
def option_model(tokenizer, tmp_path_factory):
    """An option-format student fitted to answer (B) 2.5 m and (C) It never stops., saved and loaded."""
    from rgpt4d.infer import RGPT4D, save_inference_model

    student = make_student(tokenizer, answer_format="option")
    targets = [answer_ids(tokenizer, "option", "B", "2.5 m")[0], answer_ids(tokenizer, "option", "C",
                                                                            "It never stops.")[0]]
    student = _train(student, make_batch(tokenizer, student.config, answers=targets, prompts=PROMPTS))
    path = tmp_path_factory.mktemp("option_student")
    save_inference_model(student, tokenizer, path)
    return RGPT4D.from_pretrained(path)


def _items():
    g = torch.Generator().manual_seed(1)
    frames = torch.randint(0, 256, (2, T, 3, 48, 48), dtype=torch.uint8, generator=g)
    ts = torch.cumsum(torch.rand(2, T, generator=g) + 0.05, 1)
    boxes = [[[2.0, 3.0, 20.0, 30.0], [30.0, 30.0, 47.0, 47.0]], [[5.0, 5.0, 12.0, 40.0], [10.0, 1.0, 44.0, 22.0]]]
    return [dict(video=frames[i], timestamps=ts[i].tolist(), regions=boxes[i], prompt=PROMPTS[i], options=OPTIONS[i])
            for i in range(2)]


def test_option_format_is_read_by_likelihood_and_by_its_written_letter(option_model):
    assert option_model.model.config.answer_format == "option" and option_model.default_scoring() == "likelihood"
    items = _items()
    scores = option_model.option_scores(items)
    assert scores[0].argmax() == 1 and scores[1].argmax() == 2
    assert option_model.answer_batch(items, progress=False) == ["B", "C"]
    assert option_model.answer_batch(items, progress=False, scoring="likelihood") == ["B", "C"]
    # generation writes the option's text, then its letter; "letter" scoring reads that letter
    seqs = option_model.model.generate(**option_model._prepare(items), max_new_tokens=12)
    text = option_model.tokenizer.batch_decode(seqs, skip_special_tokens=True)
    assert [t.strip() for t in text] == ["2.5 m (B)", "It never stops. (C)"]
    assert option_model.answer_batch(items, progress=False, scoring="letter") == ["B", "C"]


def test_letter_scoring_falls_back_to_likelihood_when_no_letter_is_written(option_model, monkeypatch):
    items = _items()
    monkeypatch.setattr(option_model.model, "generate", lambda **kw: torch.full((2, 3), 5))
    assert option_model.answer_batch(items, progress=False, scoring="letter") == ["B", "C"]


def test_letter_model_scored_by_likelihood_too(tokenizer):
    """Likelihood scoring works for any model: here a letter-format one, untrained (any valid letter)."""
    from rgpt4d.infer import RGPT4D

    model = RGPT4D(make_student(tokenizer, answer_format="letter"), tokenizer)
    assert model.default_scoring() == "letter"
    out = model.answer_batch(_items(), progress=False, scoring="likelihood")
    assert out[0] in "AB" and out[1] in "ABC"


def test_scoring_errors(option_model):
    items = _items()
    with pytest.raises(ValueError, match="scoring: must be one of"):
        option_model.answer_batch(items, progress=False, scoring="vote")
    no_options = [dict(items[0])]
    del no_options[0]["options"]
    with pytest.raises(ValueError, match="items: question 0 has no `options`"):
        option_model.answer_batch(no_options, progress=False)
    video = np.zeros((T, 32, 32, 3), dtype=np.uint8)
    assert option_model.answer(video, [0.0, 0.5, 1.0, 2.0], [[1, 1, 20, 20]], "How tall is <obj_1>?",
                               ["1 m", "2.5 m"]) in ("A", "B")


# ---------------------------------------------------------------------------------------------
# The rank format: all-number options answered by their rank among the options
# ---------------------------------------------------------------------------------------------


def test_numeric_ranks_and_answer_text():
    from rgpt4d.models.tokenizer import RANK_TEXTS, answer_text, numeric_ranks

    assert numeric_ranks(["2.4 m", "0.81 m", "10 m", "1.2 m"]) == [2, 0, 3, 1]
    assert numeric_ranks(["45°", "-30°", "5°", "90°"]) == [2, 0, 1, 3]
    assert numeric_ranks([0, 1, 3, 2]) == [0, 1, 3, 2]  # counts (ints, no unit)
    assert numeric_ranks(["0.5 m/s", "0.05 m/s"]) == [1, 0]
    for not_numbers in (["(1.0, 2.0, 0.5) m", "(1.0, 2.0, 0.6) m"], ["1 m", "2 s"], ["1 s", "It never stops."],
                        ["yes", "no"], ["1 m", "1 m"], ["3 m"], [f"{i} m" for i in range(len(RANK_TEXTS) + 1)]):
        assert numeric_ranks(not_numbers) is None, not_numbers
    opts = ["2.4 m", "0.81 m", "10 m", "1.2 m"]
    assert [answer_text("rank", opts, k) for k in range(4)] == [
        "third smallest", "smallest", "fourth smallest", "second smallest"]
    assert [answer_text("option", opts, k) for k in range(4)] == opts
    assert answer_text("rank", ["yes", "no", "It never stops."], 2) == "It never stops."


def test_answer_ids_rank_format(tokenizer):
    eos = special_token_ids(tokenizer)["eos"]
    ids, n = answer_ids(tokenizer, "rank", "B", "2.5 m", ["1 m", "2.5 m"])
    assert ids[:n] == _enc(tokenizer, "second smallest") and ids[-1] == eos
    assert tokenizer.decode(ids, skip_special_tokens=True) == "second smallest (B)"
    ids, n = answer_ids(tokenizer, "rank", "C", "It never stops.", OPTIONS[1])  # not numbers: the text
    assert ids == answer_ids(tokenizer, "option", "C", "It never stops.")[0]
    with pytest.raises(ValueError, match="options: the rank answer format needs"):
        answer_ids(tokenizer, "rank", "B", "2.5 m")
    with pytest.raises(ValueError, match="option: \\(B\\) is not '3 m'"):
        answer_ids(tokenizer, "rank", "B", "3 m", ["1 m", "2.5 m"])


def test_rank_format_trains_and_scores_the_same_tokens(tokenizer, tmp_path):
    from rgpt4d.infer import RGPT4D, save_inference_model
    from rgpt4d.train.inputs import batch_to_inputs

    batch = dict(prompt=PROMPTS, answer_index=torch.tensor([1, 2]), options=OPTIONS,
                 frames=torch.zeros(2, T, 3, 32, 32, dtype=torch.uint8), timestamps=torch.arange(T).float()[None].repeat(2, 1))
    student = make_student(tokenizer, answer_format="rank")
    lab = batch_to_inputs(batch, tokenizer, student.config)["labels"]
    assert [tokenizer.decode(r[r != -100].tolist(), skip_special_tokens=True) for r in lab] == [
        "second smallest (B)", "It never stops. (C)"]
    targets = [answer_ids(tokenizer, "rank", "B", "2.5 m", OPTIONS[0])[0],
               answer_ids(tokenizer, "rank", "C", "It never stops.", OPTIONS[1])[0]]
    # (rank texts are a few tokens longer than these options: more steps than the option model's)
    student = _train(student, make_batch(tokenizer, student.config, answers=targets, prompts=PROMPTS), steps=60)
    save_inference_model(student, tokenizer, tmp_path)
    model = RGPT4D.from_pretrained(tmp_path)
    assert model.model.config.answer_format == "rank" and model.default_scoring() == "likelihood"
    items = _items()
    # likelihood scoring reads the rank texts for the all-number question, the option texts otherwise
    scores = model.option_scores(items)
    inputs = model._prepare(items)
    want = [[_enc(tokenizer, t) for t in ("smallest", "second smallest")],
            [_enc(tokenizer, o) for o in OPTIONS[1]]]
    torch.testing.assert_close(scores, model.model.option_log_likelihoods(options=want, **inputs))
    assert model.answer_batch(items, progress=False) == ["B", "C"]
    # (reading the letter the model writes after its text is the option format's code path, tested above)


# ---------------------------------------------------------------------------------------------
# Multi-turn training sequences (one video, several questions)
# ---------------------------------------------------------------------------------------------


def test_encode_conversations(tokenizer):
    from rgpt4d.data.schema import PROMPT_PREAMBLE, format_prompt
    from rgpt4d.models.tokenizer import encode_conversations

    ids = special_token_ids(tokenizer)
    p1, p2 = format_prompt("How tall is <obj_1>?", ["1 m", "2 m"]), format_prompt("Is <obj_2> left?", ["yes", "no"])
    a1, a2, a3 = (answer_ids(tokenizer, "option", "B", "2 m")[0], answer_ids(tokenizer, "option", "A", "yes")[0],
                  answer_ids(tokenizer, "option", "A", "1 m")[0])
    enc = encode_conversations(tokenizer, [[p1, p2], [p1]], 3, [[a1, a2], [a3]])
    seq = enc["input_ids"][0][enc["attention_mask"][0].bool()].tolist()
    assert seq.count(ids["image"]) == 3 and seq.count(ids["user"]) == 2 and seq.count(ids["assistant"]) == 2
    text = tokenizer.decode(seq)
    assert text.count(PROMPT_PREAMBLE.split("<obj_1>")[0]) == 1  # the preamble in the first turn only
    assert text.index("How tall") < text.index("2 m (B)") < text.index("Is <obj_2> left?") < text.index("yes (A)")
    assert enc["labels"][0][enc["labels"][0] != -100].tolist() == a1 + a2
    assert enc["labels"][1][enc["labels"][1] != -100].tolist() == a3
    # a one-turn conversation is exactly encode_batch's sequence
    single = encode_batch(tokenizer, [p1], 3, [a3])
    assert single["input_ids"][0].tolist() == enc["input_ids"][1][enc["attention_mask"][1].bool()].tolist()
    with pytest.raises(ValueError, match="conversation 0 has 2 prompts and 1 answers"):
        encode_conversations(tokenizer, [[p1, p2]], 3, [[a1]])
    with pytest.raises(ValueError, match="answers: answer 1 of conversation 0 has no tokens"):
        encode_conversations(tokenizer, [[p1, p2]], 3, [[a1, []]])


# ---------------------------------------------------------------------------------------------
# The regions' line at the end of the prompt (RGPT4DConfig.restate_regions)
# ---------------------------------------------------------------------------------------------


def test_restate_regions_names_the_question_regions_in_order_of_mention():
    from rgpt4d.data.schema import format_prompt
    from rgpt4d.models.tokenizer import restate_regions

    p = format_prompt("Where is <obj_3> relative to <obj_1>, and is <obj_3> moving?", ["yes", "no"])
    assert restate_regions(p) == p + "\nRegions: <obj_3> <obj_1>"  # the preamble's <obj_1>, <obj_2> are examples
    plain = format_prompt("How many marked objects move?", [1, 2])
    assert restate_regions(plain) == plain  # no region: no line


def test_restated_regions_sit_right_before_the_answer(tokenizer):
    from rgpt4d.data.schema import format_prompt
    from rgpt4d.models.tokenizer import encode_conversations, obj_token

    ids = special_token_ids(tokenizer)
    vocab = tokenizer.get_vocab()
    p1, p2 = format_prompt("Is <obj_2> left of <obj_1>?", ["yes", "no"]), format_prompt("How tall is <obj_3>?", ["1 m"])
    a = answer_ids(tokenizer, "option", "A", "yes")[0]
    conversation = encode_conversations(tokenizer, [[p2, p1]], 3, [[a, a]], restate=True)
    for enc in (encode_batch(tokenizer, [p1], 3, [a], restate=True), conversation):
        seq = enc["input_ids"][0].tolist()
        last = max(i for i, t in enumerate(seq) if t == ids["assistant"])
        objs = [t for t in seq[last - 4:last] if t in (vocab[obj_token(1)], vocab[obj_token(2)])]
        assert seq[last - 1] == vocab[obj_token(1)] and objs == [vocab[obj_token(2)], vocab[obj_token(1)]]
        labels = enc["labels"][0].tolist()
        assert labels[last + 1:] == a and labels[last] == -100  # the answer follows the regions' line
    # every turn of a conversation ends with its own regions
    seq = conversation["input_ids"][0].tolist()
    turns = [i for i, t in enumerate(seq) if t == ids["assistant"]]
    assert seq[turns[0] - 1] == vocab[obj_token(3)]
    # off by default: the R4D-Bench prompt as it is
    plain = encode_batch(tokenizer, [p1], 3, [a])["input_ids"][0].tolist()
    assert plain[plain.index(ids["assistant"]) - 1] not in (vocab[obj_token(1)], vocab[obj_token(2)])


def test_restated_regions_after_the_marker_predict_the_answer(tokenizer):
    """restate="answer" (RGPT4DConfig.restate_position): the question's regions right after
    `<|assistant|>`, in order of mention, so the answer's first token is predicted at the last region
    token's own position; no `Regions:` line; every turn of a conversation likewise."""
    from rgpt4d.data.schema import format_prompt
    from rgpt4d.models.tokenizer import ASSISTANT, chat_text, encode_conversations, obj_token

    ids = special_token_ids(tokenizer)
    vocab = tokenizer.get_vocab()
    o1, o2, o3 = (vocab[obj_token(k)] for k in (1, 2, 3))
    p1, p2 = format_prompt("Is <obj_2> left of <obj_1>?", ["yes", "no"]), format_prompt("How tall is <obj_3>?", ["1 m"])
    assert chat_text(p1, 2, "answer").endswith(ASSISTANT + "<obj_2> <obj_1>")
    assert "Regions:" not in chat_text(p1, 2, "answer")
    assert chat_text(p1, 2, True) == chat_text(p1, 2, "line")  # True keeps meaning the line
    a = answer_ids(tokenizer, "option", "A", "yes")[0]
    enc = encode_batch(tokenizer, [p1], 3, [a], restate="answer")
    seq, labels = enc["input_ids"][0].tolist(), enc["labels"][0].tolist()
    first = labels.index(a[0])
    assert labels[first:] == a and all(t == -100 for t in labels[:first])
    marker = max(i for i, t in enumerate(seq[:first]) if t == ids["assistant"])
    assert seq[first - 1] == o1 and [t for t in seq[marker + 1:first] if t in (o1, o2)] == [o2, o1]
    assert first - marker <= 4  # the marker, the two regions (and the space between them), then the answer
    conv = encode_conversations(tokenizer, [[p2, p1]], 3, [[a, a]], restate="answer")
    seq = conv["input_ids"][0].tolist()
    turns = [i for i, t in enumerate(seq) if t == ids["assistant"]]
    assert len(turns) == 2 and seq[turns[0] + 1] == o3
    assert [t for t in seq[turns[1] + 1: turns[1] + 4] if t in (o1, o2)] == [o2, o1]
    # a question without regions: nothing after the marker
    plain = format_prompt("How many marked objects move?", [1, 2])
    assert chat_text(plain, 2, "answer") == chat_text(plain, 2)
    with pytest.raises(ValueError, match="restate: must be False, True or one of"):
        chat_text(p1, 2, "after")


def test_restate_position_config_trains_and_scores(tokenizer, tmp_path):
    """The config field: validated, saved and loaded (configs saved without it read as "line"); a
    student with restate_position="answer" trains on prompts with its regions after the marker
    (batch_to_inputs), and the inference wrapper builds the same prompts and reads the answers."""
    from rgpt4d.infer import RGPT4D, save_inference_model
    from rgpt4d.models.configs import RGPT4DConfig
    from rgpt4d.train.inputs import batch_to_inputs

    with pytest.raises(ValueError, match="restate_position must be one of \\('line', 'answer'\\)"):
        RGPT4DConfig(restate_position="after")
    assert RGPT4DConfig(restate_position="answer").restate_mode() is False  # off unless restate_regions
    student = make_student(tokenizer, answer_format="option", restate_regions=True, restate_position="answer")
    assert student.config.restate_mode() == "answer"
    d = student.config.to_dict()
    d.pop("restate_position")
    assert RGPT4DConfig.from_dict(d).restate_mode() == "line"  # a config saved before the field
    ids, vocab = special_token_ids(tokenizer), tokenizer.get_vocab()
    batch = dict(prompt=PROMPTS, answer_index=torch.tensor([1, 2]), options=OPTIONS,
                 frames=torch.zeros(2, T, 3, 32, 32, dtype=torch.uint8), timestamps=torch.arange(T).float()[None].repeat(2, 1))
    enc = batch_to_inputs(batch, tokenizer, student.config)
    for row, lab, obj in zip(enc["input_ids"].tolist(), enc["labels"].tolist(), ("<obj_1>", "<obj_1>")):
        first = next(i for i, t in enumerate(lab) if t != -100)
        assert row[first - 1] == vocab[obj] and ids["assistant"] in row[first - 4:first - 1]
    targets = [answer_ids(tokenizer, "option", "B", "2.5 m")[0], answer_ids(tokenizer, "option", "C",
                                                                            "It never stops.")[0]]
    from rgpt4d.models.tokenizer import encode_batch

    fit = make_batch(tokenizer, student.config, answers=targets, prompts=PROMPTS)
    fit.update(encode_batch(tokenizer, PROMPTS, student.config.num_visual_tokens, targets, restate="answer"))
    student = _train(student, fit)
    save_inference_model(student, tokenizer, tmp_path)
    model = RGPT4D.from_pretrained(tmp_path)
    assert model.model.config.restate_position == "answer"
    items = _items()
    prepared = model._prepare(items)["input_ids"].tolist()
    assert all(row[-1] == vocab["<obj_1>"] and ids["assistant"] in row[-4:-1] for row in prepared)
    assert model.answer_batch(items, progress=False) == ["B", "C"]
