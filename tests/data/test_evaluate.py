"""The evaluator: letter extraction, the 12-column report on known predictions, both modes."""

import json

import pytest

from rgpt4d.data.cli import main
from rgpt4d.data.evaluate import evaluate, extract_letter, load_predictions
from rgpt4d.data.schema import CATEGORIES, REPORT_COLUMNS, answer_index, format_prompt


@pytest.mark.parametrize(
    "text,n,letter",
    [
        ("B", 4, "B"),
        ("(C)", 4, "C"),
        ("The answer is (D).", 4, "D"),
        ("The answer is A", 4, "A"),
        ("Answer: B", 4, "B"),
        ("answer: the red box, C", 4, "C"),
        ("The correct option is (b)", 4, "B"),
        ("I pick (F), no, (E)", 5, "E"),  # the first "(X)" with a *valid* letter
        ("(E) seems right", 4, None),  # E is not an option of a 4-option question
        ("E", 4, None),
        ("It moves to the left", 4, None),  # no standalone capital letter
        ("so D it is", 4, "D"),
        ("A car goes left, so B", 4, "A"),  # the official rule: the first standalone valid letter
        ("", 4, None),
        (None, 4, None),
        (3, 4, None),
    ],
)
def test_extract_letter(text, n, letter):
    assert extract_letter(text, n) == letter


def _q(i, cat, n=4, answer_pos=0):
    options = [f"opt{j}" for j in range(n)]
    return {
        "id": i,
        "task": CATEGORIES[cat],
        "question": "?",
        "options": options,
        "answer": options[answer_pos],
    }


def test_report_on_known_predictions():
    # per category: VG 2/2, DM 1/2, SR 0/1; R 1/1, C 0/1, T 1/2, FP 1/1, SA 0/1, DP 1/1
    spec = [
        ("VG", True),
        ("VG", True),
        ("DM", True),
        ("DM", False),
        ("SR", False),
        ("R", True),
        ("C", False),
        ("T", True),
        ("T", False),
        ("FP", True),
        ("SA", False),
        ("DP", True),
    ]
    questions, preds = [], {}
    for i, (cat, right) in enumerate(spec):
        q = _q(i if i % 2 else str(i), cat, n=5 if cat == "FP" else 4, answer_pos=i % 4)
        questions.append(q)
        truth = "ABCD"[i % 4]
        preds[str(i)] = f"The answer is ({truth})" if right else ("(A)" if truth != "A" else "B")
    rep = evaluate(questions, preds)
    s = rep.scores
    assert list(s) == list(REPORT_COLUMNS)
    assert s["Avg"] == pytest.approx(100 * 7 / 12)
    assert s["Sta"] == pytest.approx(100 * 3 / 5)
    assert s["Dyn"] == pytest.approx(100 * 4 / 7)
    expected = {"VG": 100, "DM": 50, "SR": 0, "R": 100, "C": 0, "T": 50, "FP": 100, "SA": 0, "DP": 100}
    for cat, val in expected.items():
        assert s[cat] == pytest.approx(val)
    assert rep.counts["Avg"] == 12 and rep.counts["Sta"] == 5 and rep.unparseable == 0
    md = rep.to_markdown()
    assert md.splitlines()[0] == "| " + " | ".join(REPORT_COLUMNS) + " |"
    assert "| 58.3 | 60.0 | 57.1 | 100.0 | 50.0 | 0.0 |" in md


def test_unparseable_wrong_by_default_and_seeded_random_on_request():
    questions = [_q(i, "T", answer_pos=i % 4) for i in range(400)]
    preds = {str(i): "I cannot tell" for i in range(399)}  # the last one is missing
    wrong = evaluate(questions, preds)
    assert wrong.scores["Avg"] == 0.0 and wrong.unparseable == 400 and wrong.missing == 1
    assert wrong.scores["VG"] is None and "| - |" in wrong.to_markdown()
    r1 = evaluate(questions, preds, unparseable="random", seed=1)
    r1b = evaluate(questions, preds, unparseable="random", seed=1)
    r2 = evaluate(questions, preds, unparseable="random", seed=2)
    assert r1.scores == r1b.scores
    assert [x.scored_as for x in r1.results] != [x.scored_as for x in r2.results]
    assert 15.0 < r1.scores["Avg"] < 35.0  # a random letter is right about a quarter of the time
    assert all(x.predicted is None and x.scored_as in "ABCD" for x in r1.results)
    with pytest.raises(ValueError, match="unparseable must be"):
        evaluate(questions, preds, unparseable="skip")


def test_answer_index_handles_mixed_release_types():
    assert answer_index([1, 0, "0", None], 0) == 1  # int 0, not the string, not False
    assert answer_index([True, 0, 1], 0) == 1
    assert answer_index(["left", None, "right"], None) == 1
    assert answer_index([1.5, "2", 3], 2) == 1  # text fallback
    assert answer_index([0.5, 1.0], 1) == 1
    with pytest.raises(ValueError, match="not among the options"):
        answer_index(["a", "b"], "c", entry_id=7)
    prompt = format_prompt("Q <obj_1>?", [0, None, "x"])
    assert prompt.splitlines()[-4:] == [
        "(A) 0",
        "(B) None",
        "(C) x",
        "Answer with only the letter of the correct option.",
    ]


def test_cli_eval_answers(tmp_path, capsys):
    questions = [_q(i, "SA", answer_pos=1) for i in range(4)]
    qpath = tmp_path / "test.json"
    qpath.write_text(json.dumps(questions))
    ppath = tmp_path / "preds.jsonl"
    ppath.write_text(
        "\n".join(json.dumps({"id": i, "prediction": p}) for i, p in enumerate(["B", "(B)", "A", "??"]))
    )
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    assert (
        main(
            [
                "eval-answers",
                "--questions",
                str(qpath),
                "--predictions",
                str(ppath),
                "--json",
                str(out_json),
                "--markdown",
                str(out_md),
            ]
        )
        == 0
    )
    rep = json.loads(out_json.read_text())
    assert rep["scores"]["SA"] == 50.0 and rep["scores"]["Avg"] == 50.0 and rep["unparseable"] == 1
    assert out_md.read_text().startswith("| Avg | Sta | Dyn | VG | DM | SR | R | C | T | FP | SA | DP |")
    assert "50.0" in capsys.readouterr().out
    ppath.write_text('{"id": 1}\n')
    assert main(["eval-answers", "--questions", str(qpath), "--predictions", str(ppath)]) == 2
    assert "--predictions" in capsys.readouterr().err
    assert (
        main(["eval-answers", "--questions", str(tmp_path / "nope.json"), "--predictions", str(ppath)]) == 2
    )
    assert "--questions" in capsys.readouterr().err
    ppath.write_text('{"id": 1, "response": "C"}\nnot json\n')
    with pytest.raises(ValueError, match=r"preds.jsonl:2: not JSON"):
        load_predictions(ppath)
