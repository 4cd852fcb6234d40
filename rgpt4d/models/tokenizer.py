"""The student's tokenizer: a byte-level BPE trained offline with `tokenizers` on the question and
answer vocabulary, wrapped as a `transformers.PreTrainedTokenizerFast` (save/from_pretrained).

Special tokens: `<pad>`, `<s>`, `</s>` (end of answer), `<image>` (one placeholder per visual
token), `<obj_1>` ... `<obj_K>` (region references; the student puts region tokens there),
`<|user|>`, `<|assistant|>`. Byte-level BPE never produces an unknown token, so any question,
number or unit can be written; digits are split one by one so numbers are compositional.

A pretrained tokenizer (Qwen2's, NVILA's; rgpt4d.models.prepare_tokenizer adds `<image>` and
`<obj_N>` to it) works too: its own pad/eos tokens are used, and when it has a chat template the
prompt is written with that template (one user turn, then the generation prompt) instead of
`<|user|>`/`<|assistant|>`.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import torch

from rgpt4d.data.questions import NEVER_STOPS, TEMPLATES
from rgpt4d.data.schema import PROMPT_PREAMBLE, PROMPT_SUFFIX

PAD, BOS, EOS, IMAGE, USER, ASSISTANT = "<pad>", "<s>", "</s>", "<image>", "<|user|>", "<|assistant|>"
LETTERS = "ABCDEFGHIJ"
ANSWER_FORMATS = ("letter", "option", "rank")  # what an SFT target is: answer_ids


def obj_token(n: int) -> str:
    return f"<obj_{n}>"


def special_tokens(max_regions: int = 8) -> list[str]:
    return [PAD, BOS, EOS, IMAGE, USER, ASSISTANT] + [obj_token(n) for n in range(1, max_regions + 1)]


def default_corpus() -> list[str]:
    """Texts covering the synthetic benchmark's vocabulary: every template, choice, unit and the
    evaluation prompt, with numbers and letters; enough to train the tokenizer without data."""
    texts = [PROMPT_PREAMBLE, PROMPT_SUFFIX, NEVER_STOPS, f"{REGIONS_LINE} <obj_1> <obj_2>"]
    names = ["red", "green", "blue", "yellow", "orange", "purple", "white", "black", "grey", "pink", "cyan",
             "brown", "box", "cylinder", "ball", "the"]
    for t in TEMPLATES.values():
        for a in names:
            texts.append(t.text.format(A=f"the {a} box", B=f"the {a} ball"))
        texts.append(t.text.format(A="<obj_1>", B="<obj_2>"))
        texts.extend(str(c) for c in t.choices)
        texts.append(t.unit)
    for i in range(200):
        texts.append(f"({LETTERS[i % 5]}) {i / 10:.1f} m {i}°/s {i * 0.37:.2f} m/s² ({i % 7 - 3}, {i % 5 - 2}, {i % 9}) m")
    return texts


def train_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 1000, max_regions: int = 8):
    """Train the BPE on `texts` (default: `default_corpus()`); returns a PreTrainedTokenizerFast."""
    # start-up: transformers' tokenizer classes take ~1 s to import (python -X importtime); the
    # `rgpt4d` command's parser imports this module (through rgpt4d.train.config)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(default_corpus() if texts is None else texts)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = special_tokens(max_regions)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   additional_special_tokens=specials[3:], padding_side="left")
    return fast


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def special_token_ids(tokenizer, regions: bool = True) -> dict:
    """Ids of the special tokens the student needs; a clear error if the tokenizer lacks one.

    pad / eos / bos: the tokenizer's own (`pad_token_id`...), else `<pad>`, `</s>`, `<s>` from its
    vocabulary (bos may be None). `<|user|>` / `<|assistant|>` are needed only without a chat
    template (None otherwise). `obj`: the ids of `<obj_1>`, `<obj_2>`, ... (needed unless
    `regions=False`: a model that reads regions from the SoM image alone)."""
    vocab = tokenizer.get_vocab()
    hint = "train it with rgpt4d.models.train_tokenizer or prepare it with rgpt4d.models.prepare_tokenizer"
    out = {}
    for key, text, required in (("pad", PAD, True), ("eos", EOS, True), ("bos", BOS, False)):
        tid = getattr(tokenizer, f"{key}_token_id", None)
        out[key] = tid if tid is not None else vocab.get(text)
        if required and out[key] is None:
            raise ValueError(f"tokenizer: no {key} token (neither {key}_token nor {text!r}); {hint}")
    if IMAGE not in vocab:
        raise ValueError(f"tokenizer: missing the special token {IMAGE!r}; {hint}")
    out["image"] = vocab[IMAGE]
    template = has_chat_template(tokenizer)
    for key, text in (("user", USER), ("assistant", ASSISTANT)):
        if text not in vocab and not template:
            raise ValueError(f"tokenizer: missing the special token {text!r} (and no chat template); {hint}")
        out[key] = vocab.get(text)
    objs, n = [], 1
    while obj_token(n) in vocab:
        objs.append(vocab[obj_token(n)])
        n += 1
    if not objs and regions:
        raise ValueError(f"tokenizer: no <obj_N> tokens; {hint}")
    out["obj"] = objs
    return out


def single_token_id(tokenizer, text: str, what: str) -> int:
    """The id of `text` when the tokenizer writes it as exactly one token (e.g. the frame separator "\n")."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{what}: {text!r} is {len(ids)} tokens ({ids}) for this tokenizer, expected one")
    return ids[0]


def letter_token_ids(tokenizer, n: int = 5) -> list[int]:
    """Token id of each answer letter A, B, ... (each is a single byte-level token)."""
    ids = []
    for letter in LETTERS[:n]:
        enc = tokenizer.encode(letter, add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(f"tokenizer: the letter {letter!r} is not one token ({enc})")
        ids.append(enc[0])
    return ids


# "2.4 m", "45°", "0.05 m/s", "3": a number, then an optional unit
_NUMBER_OPTION = re.compile(r"^\s*(-?\d+(?:\.\d+)?(?:[eE]-?\d+)?)\s*([^\d\s(),][^\d(),]*)?\s*$")
RANK_TEXTS = ("smallest", "second smallest", "third smallest", "fourth smallest", "fifth smallest",
              "sixth smallest")


def numeric_ranks(options: Sequence[str]) -> list[int] | None:
    """Each option's rank by value (0: the smallest) when every option is a plain number in one
    unit ("2.4 m", "45°", "3") and the values are distinct; else None (vectors, words, mixed units,
    "It never stops.", more options than RANK_TEXTS)."""
    values, units = [], set()
    for o in options:
        m = _NUMBER_OPTION.match(str(o))
        if m is None:
            return None
        values.append(float(m.group(1)))
        units.add((m.group(2) or "").strip())
    if len(options) < 2 or len(options) > len(RANK_TEXTS) or len(units) != 1 or len(set(values)) != len(values):
        return None
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0] * len(values)
    for r, i in enumerate(order):
        ranks[i] = r
    return ranks


def answer_text(answer_format: str, options: Sequence[str], index: int) -> str:
    """The text a model in `answer_format` ("option" or "rank") writes for option `index`: the
    option's own text, or for "rank" and an all-number option set, the option's rank by value
    among them (`RANK_TEXTS`: "smallest", "second smallest", ...). A from-scratch LLM then picks a
    value by where it lies among the offered ones, a choice among a few words, instead of spelling
    the number digit by digit (docs/results/README.md). Training (`answer_ids`) and likelihood
    scoring (`rgpt4d.infer`) both call this, so they read the same tokens."""
    if answer_format == "rank":
        ranks = numeric_ranks(options)
        if ranks is not None:
            return RANK_TEXTS[ranks[index]]
    return str(options[index])


def answer_ids(tokenizer, answer_format: str, letter: str, option: str,
               options: Sequence[str] | None = None) -> tuple[list[int], int]:
    """The SFT target of one question as token ids (ending with `</s>`), and how many leading ids
    are the answer's text (what likelihood scoring reads; 0 for the letter format).

    answer_format "letter": `B</s>`. "option": the option's text, then its letter: `0.81 m (B)</s>`.
    "rank" (needs `options`, the question's option texts): as "option", with the option's rank
    among all-number options as its text (`answer_text`): `second smallest (B)</s>`.
    The text and the letter are encoded separately, so the text's tokens are the same ones
    `rgpt4d.infer` scores for that option.
    """
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format: must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    if letter not in LETTERS:
        raise ValueError(f"letter: expected one of {LETTERS!r}, got {letter!r}")
    eos = special_token_ids(tokenizer, regions=False)["eos"]
    if answer_format == "letter":
        return tokenizer.encode(letter, add_special_tokens=False) + [eos], 0
    if answer_format == "rank":
        if options is None:
            raise ValueError("options: the rank answer format needs the question's option texts")
        k = LETTERS.index(letter)
        if k >= len(options) or str(options[k]) != str(option):
            raise ValueError(f"option: ({letter}) is not {option!r} in options {list(options)!r}")
        option = answer_text("rank", options, k)
    text = tokenizer.encode(str(option), add_special_tokens=False)
    if not text:
        raise ValueError(f"option: the option text for ({letter}) is empty")
    return text + tokenizer.encode(f" ({letter})", add_special_tokens=False) + [eos], len(text)


def _plain_preamble(prompt: str) -> str:
    """The evaluation preamble names `<obj_1>, <obj_2>, ...` as an example, not as references: write
    those without brackets so they do not become region tokens (only the question's do)."""
    if PROMPT_PREAMBLE in prompt:
        prompt = prompt.replace(PROMPT_PREAMBLE, PROMPT_PREAMBLE.replace("<obj_1>", "obj_1").replace("<obj_2>", "obj_2"))
    return prompt


REGIONS_LINE = "Regions:"


RESTATE_MODES = ("line", "answer")


def _restate_mode(restate) -> str | None:
    """restate argument -> None (off), "line" or "answer" (True means "line")."""
    if restate is False or restate is None:
        return None
    if restate is True:
        return "line"
    if restate not in RESTATE_MODES:
        raise ValueError(f"restate: must be False, True or one of {RESTATE_MODES}, got {restate!r}")
    return restate


def question_regions(prompt: str) -> list[str]:
    """The `<obj_N>` tokens `prompt`'s question refers to, in the order of their first mention (the
    preamble's `<obj_1>, <obj_2>, ...` are examples, not references)."""
    return list(dict.fromkeys(re.findall(r"<obj_\d+>", _plain_preamble(prompt))))


def restate_regions(prompt: str) -> str:
    """`prompt` with a last line naming the regions its question refers to, in the order of their
    first mention: `...\nRegions: <obj_3> <obj_1>` (unchanged when it names none).

    Why (RGPT4DConfig.restate_regions): the answer is written right after this line, so its region
    tokens sit next to the answer, where a from-scratch LLM's attention finds them without first
    learning to pick one position out of ~280 (visual tokens, question, options) ~100 tokens back.
    Three static templates, same data and budget, four paired runs (docs/results/README.md): 28.6 -> 35.7 %
    on average, better in every pair (+0.7 to +11.3 points)."""
    objs = question_regions(prompt)
    return f"{prompt}\n{REGIONS_LINE} {' '.join(objs)}" if objs else prompt


def _turn(prompt: str, restate, head: str, tokenizer=None) -> str:
    """One user turn: `head` + the prompt + `<|assistant|>`, the question's regions restated as
    `restate` says: "line" (or True) ends the prompt with `restate_regions`'s line; "answer" puts
    the region tokens right after `<|assistant|>`, so the answer's first token is predicted at the
    (last) region token's own position (RGPT4DConfig.restate_position).

    With a `tokenizer` that has a chat template, the turn is that template's rendering of one user
    message (`head` + the prompt) with the generation prompt, instead of `<|user|>`...`<|assistant|>`
    (`head` then holds no `<|user|>`)."""
    mode = _restate_mode(restate)
    if mode == "line":
        prompt = restate_regions(prompt)
    tail = " ".join(question_regions(prompt)) if mode == "answer" else ""
    if tokenizer is not None and has_chat_template(tokenizer):
        message = [{"role": "user", "content": f"{head}{_plain_preamble(prompt)}"}]
        return tokenizer.apply_chat_template(message, add_generation_prompt=True, tokenize=False) + tail
    return f"{head}{_plain_preamble(prompt)}{ASSISTANT}{tail}"


def chat_text(prompt: str, num_visual_tokens: int, restate=False) -> str:
    """The student's conversation: user turn with the visual placeholders and the prompt, then the
    assistant marker; the answer (a letter and `</s>`) follows it. `restate` (False, True or "line",
    "answer"): how the question's regions are restated (`_turn`)."""
    return _turn(prompt, restate, f"{USER}{IMAGE * num_visual_tokens}\n")


def _first_turn_ids(tokenizer, prompt: str, visual, restate, image: int) -> list[int]:
    """The first user turn's ids with the visual block in place.

    visual: an int n (n `<image>` ids followed by the text "\n", `chat_text`'s layout) or a list of
    ids inserted as they are (RGPT4DConfig.visual_token_ids: per image its `<image>` ids and, NVILA's
    layout, the frame separator; the prompt text follows the block directly). The turn is tokenized
    with one `<image>` mark that is then replaced by the block: the text around it tokenizes the
    same (special tokens split the text), and no separator can merge with the text after it.
    `image`: the `<image>` id."""
    block = [image] * visual if isinstance(visual, int) else [int(t) for t in visual]
    mark = IMAGE + ("\n" if isinstance(visual, int) else "")
    template = has_chat_template(tokenizer)
    ids = tokenizer.encode(_turn(prompt, restate, mark if template else USER + mark, tokenizer),
                           add_special_tokens=False)
    at = [k for k, t in enumerate(ids) if t == image]
    if len(at) != 1:
        raise ValueError(f"prompts: a prompt must not contain {IMAGE!r} itself (the visual tokens go there), "
                         f"got {prompt[:80]!r}")
    return ids[:at[0]] + block + ids[at[0] + 1:]


def encode_batch(tokenizer, prompts: Sequence[str], num_visual_tokens, answers: Sequence | None = None,
                 *, restate=False):
    """Token ids for a batch (left-padded). With `answers`, each answer is appended and `labels`
    mark only those tokens (-100 elsewhere): the SFT loss is on the answer only. An answer is a
    string (encoded, then `</s>` appended) or a list of token ids used as they are (`answer_ids`).
    `restate` (False, True or "line", "answer"): how each question's regions are restated (`chat_text`).
    `num_visual_tokens`: an int, or the visual block's ids (RGPT4DConfig.visual_token_ids; `_first_turn_ids`).

    Returns dict(input_ids, attention_mask[, labels]) of int64 tensors [B, L].
    """
    if answers is not None and len(answers) != len(prompts):
        raise ValueError(f"answers: {len(answers)} answers for {len(prompts)} prompts")
    ids = special_token_ids(tokenizer, regions=False)
    seqs, labels = [], []
    for i, p in enumerate(prompts):
        prompt_ids = _first_turn_ids(tokenizer, p, num_visual_tokens, restate, ids["image"])
        if answers is None:
            seqs.append(prompt_ids)
            continue
        ans = (tokenizer.encode(answers[i], add_special_tokens=False) + [ids["eos"]] if isinstance(answers[i], str)
               else [int(t) for t in answers[i]])
        if not ans:
            raise ValueError(f"answers: answer {i} has no tokens")
        seqs.append(prompt_ids + ans)
        labels.append([-100] * len(prompt_ids) + ans)
    return _left_pad(seqs, labels if answers is not None else None, ids["pad"])


def encode_conversations(tokenizer, conversations: Sequence[Sequence[str]], num_visual_tokens: int,
                         answers: Sequence[Sequence[Sequence[int]]], *, restate=False):
    """Multi-turn training sequences, one per video: the visual placeholders once, then each
    question's prompt and its answer (token ids, `answer_ids`), with labels on every answer. The
    first turn is `chat_text`; later turns are `<|user|>` + the prompt without the preamble (it is
    the same for every question) + `<|assistant|>`; `restate` restates every turn's regions as
    `chat_text` does. Left-padded like `encode_batch`."""
    if len(answers) != len(conversations):
        raise ValueError(f"answers: {len(answers)} answer lists for {len(conversations)} conversations")
    if has_chat_template(tokenizer) and any(len(c) > 1 for c in conversations):
        raise ValueError("conversations: multi-turn sequences are written with <|user|>/<|assistant|>; a tokenizer "
                         "with a chat template takes one question per sequence (questions_per_sequence 1)")
    ids = special_token_ids(tokenizer, regions=False)
    seqs, labels = [], []
    for c, (prompts, ans) in enumerate(zip(conversations, answers)):
        if not prompts or len(prompts) != len(ans):
            raise ValueError(f"conversations: conversation {c} has {len(prompts)} prompts and {len(ans)} answers "
                             "(needs at least one of each, as many of each)")
        seq, lab = [], []
        for k, (p, a) in enumerate(zip(prompts, ans)):
            if not len(a):
                raise ValueError(f"answers: answer {k} of conversation {c} has no tokens")
            if k == 0:
                p_ids = _first_turn_ids(tokenizer, p, num_visual_tokens, restate, ids["image"])
            else:
                p = p.replace(PROMPT_PREAMBLE + chr(10), "")
                p_ids = tokenizer.encode(_turn(p, restate, USER), add_special_tokens=False)
            seq += p_ids + [int(t) for t in a]
            lab += [-100] * len(p_ids) + [int(t) for t in a]
        seqs.append(seq)
        labels.append(lab)
    return _left_pad(seqs, labels, ids["pad"])


def _left_pad(seqs: list[list[int]], labels: list[list[int]] | None, pad: int) -> dict:
    L = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    lab = torch.full((len(seqs), L), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, L - len(s):] = torch.tensor(s)
        mask[i, L - len(s):] = 1
        if labels is not None:
            lab[i, L - len(s):] = torch.tensor(labels[i])
    out = {"input_ids": input_ids, "attention_mask": mask}
    if labels is not None:
        out["labels"] = lab
    return out
