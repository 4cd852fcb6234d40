"""The R4D-Bench evaluator: letter extraction, accuracy per category, the 12-column report.

Letter extraction (PAPER.md): strip prefixes such as "The answer is" or "Answer:", take the first
"(X)" with X a valid letter, else the first standalone valid capital letter. Answers with no valid
letter are wrong by default; `unparseable="random"` instead draws a letter with a seeded generator,
as the official evaluation does. A question without a prediction counts as unparseable.

Report columns: Avg (all questions), Sta (VG, DM, SR), Dyn (the other six), then per category.
Values are accuracies in percent; a column with no questions is None ("-" in markdown).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from rgpt4d.data.schema import LETTERS, REPORT_COLUMNS, STATIC_CATEGORIES, answer_index, category_of

PREDICTION_KEYS = ("prediction", "response", "output", "text", "pred")

_PREFIXES = re.compile(
    r"^\s*(?:the\s+)?(?:best\s+|correct\s+|final\s+)?(?:answer|option|choice)\s*(?:is|:)?\s*[:\-]?\s*",
    re.IGNORECASE,
)


def extract_letter(text: Any, num_options: int) -> str | None:
    """The chosen letter in free text, or None when it names no valid option."""
    if text is None:
        return None
    if not isinstance(text, str):
        text = str(text)
    if num_options < 1:
        raise ValueError(f"num_options must be >= 1, got {num_options}")
    valid = LETTERS[:num_options]
    s = text.strip()
    prev = None
    while prev != s:  # "Answer: The answer is (B)" -> "(B)"
        prev = s
        s = _PREFIXES.sub("", s, count=1).strip()
    for m in re.finditer(r"\(\s*([A-Za-z])\s*\)", s):
        if m.group(1).upper() in valid:
            return m.group(1).upper()
    for m in re.finditer(r"(?<![A-Za-z0-9])([A-Z])(?![A-Za-z0-9])", s):
        if m.group(1) in valid:
            return m.group(1)
    return None


@dataclass
class QuestionResult:
    id: str
    category: str
    answer: str  # correct letter
    predicted: str | None  # extracted letter (None when unparseable)
    scored_as: str | None  # letter used for scoring (random draw in "random" mode)
    correct: bool


@dataclass
class Report:
    scores: dict[str, float | None]
    counts: dict[str, int]
    unparseable: int
    missing: int
    mode: str
    results: list[QuestionResult] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # bad entries left out (check_entries)

    def to_json(self) -> dict[str, Any]:
        return {
            "scores": self.scores,
            "counts": self.counts,
            "unparseable": self.unparseable,
            "missing": self.missing,
            "unparseable_mode": self.mode,
            "skipped": len(self.skipped),
            "skipped_entries": self.skipped,
        }

    def to_markdown(self) -> str:
        head = "| " + " | ".join(REPORT_COLUMNS) + " |"
        rule = "|" + "|".join("---:" for _ in REPORT_COLUMNS) + "|"
        row = (
            "| "
            + " | ".join("-" if self.scores[c] is None else f"{self.scores[c]:.1f}" for c in REPORT_COLUMNS)
            + " |"
        )
        n = "| " + " | ".join(str(self.counts[c]) for c in REPORT_COLUMNS) + " |"
        note = (
            f"\n\n{self.counts['Avg']} questions; {self.unparseable} unparseable "
            f"({self.missing} missing), scored as {self.mode}."
        )
        if self.skipped:
            note += f" {len(self.skipped)} bad entries skipped (not scored): " + "; ".join(
                f"id {b['id']!r}: {b['reason']}" for b in self.skipped[:10]) + ("; ..." if len(self.skipped) > 10 else "")
        return "\n".join([head, rule, row, n]) + note


REQUIRED_FIELDS = ("id", "task", "question", "options", "answer")


class ReleaseError(ValueError):
    """Bad benchmark input (a questions file, an entry, a video or an image); the message names the
    file and the entry id."""


def entry_problem(e: Any) -> str | None:
    """What is wrong with one R4D-Bench entry (None if nothing): not an object, a missing field, no
    options, an unknown task, an answer that is not among its options."""
    if not isinstance(e, dict):
        return f"expected a JSON object, got {type(e).__name__}"
    missing = [k for k in REQUIRED_FIELDS if k not in e]
    if missing:
        return f"missing field{'s' if len(missing) > 1 else ''} {', '.join(repr(k) for k in missing)}"
    if not isinstance(e["options"], list) or not e["options"]:
        return f"'options' must be a non-empty list, got {e['options']!r}"
    if len(e["options"]) > len(LETTERS):
        return f"{len(e['options'])} options, at most {len(LETTERS)} can be lettered"
    if not isinstance(e["question"], str):
        return f"'question' must be a string, got {type(e['question']).__name__}"
    try:
        category_of(e["task"])
        answer_index(e["options"], e["answer"])
    except ValueError as err:
        return str(err)
    return None


def read_json_list(path: str | Path, what: str = "questions") -> list[Any]:
    """A JSON list from `path`; a missing file, malformed JSON or another JSON type is a clear error
    naming the file (and the line and column of a syntax error)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what} file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ReleaseError(f"{path}: not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except UnicodeDecodeError as e:
        raise ReleaseError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(data, list):
        raise ReleaseError(f"{path}: expected a JSON list of {what}, got a JSON {type(data).__name__}")
    return data


def check_entries(entries: list[Any], path: str | Path, skip_bad: bool = False
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(good entries, bad ones as {"id", "index", "file", "reason"}). Without `skip_bad` the first bad
    entry raises a ReleaseError naming the file, the entry's position and its id."""
    good, bad = [], []
    seen: dict[str, int] = {}
    for i, e in enumerate(entries):
        problem = entry_problem(e)
        eid = e.get("id") if isinstance(e, dict) else None
        if problem is None:
            if str(eid) in seen:
                problem = f"the id repeats entry {seen[str(eid)]}'s"
            else:
                seen[str(eid)] = i
        if problem is None:
            good.append(e)
            continue
        if not skip_bad:
            raise ReleaseError(f"{path}: entry {i} (id {eid!r}): {problem}")
        bad.append({"id": eid, "index": i, "file": str(path), "reason": problem})
    return good, bad


def read_questions(path: str | Path, skip_bad: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The entries of an R4D-Bench style questions file, checked (check_entries): (good, bad)."""
    return check_entries(read_json_list(path), path, skip_bad)


def load_questions(path: str | Path) -> list[dict[str, Any]]:
    """The entries of a questions file; any bad entry is a ReleaseError naming the file and entry."""
    return read_questions(path)[0]


def load_predictions(path: str | Path) -> dict[str, Any]:
    """JSONL with one {"id": ..., "prediction": "..."} per line (also accepts response/output/text)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--predictions {path} does not exist")
    out: dict[str, Any] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"--predictions {path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(rec, dict) or "id" not in rec:
            raise ValueError(f"--predictions {path}:{n}: each line needs an 'id'")
        key = next((k for k in PREDICTION_KEYS if k in rec), None)
        if key is None:
            raise ValueError(
                f"--predictions {path}:{n}: no prediction field (one of {list(PREDICTION_KEYS)})"
            )
        out[str(rec["id"])] = rec[key]
    return out


def evaluate(
    questions: Iterable[dict[str, Any]],
    predictions: dict[str, Any],
    unparseable: str = "wrong",
    seed: int = 0,
) -> Report:
    """Score predictions (id -> free text) against R4D-Bench entries."""
    if unparseable not in ("wrong", "random"):
        raise ValueError(f"unparseable must be 'wrong' or 'random', got {unparseable!r}")
    rng = random.Random(seed)
    preds = {str(k): v for k, v in predictions.items()}
    results: list[QuestionResult] = []
    n_unparsed = n_missing = 0
    for e in questions:
        qid = str(e["id"])
        n = len(e["options"])
        truth = LETTERS[answer_index(e["options"], e["answer"], entry_id=e["id"])]
        if qid not in preds:
            n_missing += 1
            letter = None
        else:
            letter = extract_letter(preds[qid], n)
        scored = letter
        if letter is None:
            n_unparsed += 1
            if unparseable == "random":
                scored = LETTERS[rng.randrange(n)]
        results.append(QuestionResult(qid, category_of(e["task"]), truth, letter, scored, scored == truth))

    scores: dict[str, float | None] = {}
    counts: dict[str, int] = {}
    for col in REPORT_COLUMNS:
        if col == "Avg":
            sel = results
        elif col == "Sta":
            sel = [r for r in results if r.category in STATIC_CATEGORIES]
        elif col == "Dyn":
            sel = [r for r in results if r.category not in STATIC_CATEGORIES]
        else:
            sel = [r for r in results if r.category == col]
        counts[col] = len(sel)
        scores[col] = 100.0 * sum(r.correct for r in sel) / len(sel) if sel else None
    return Report(scores, counts, n_unparsed, n_missing, unparseable, results)
