"""The R4D-Bench vocabulary shared by the generator, the loaders and the evaluator.

Nine categories (PAPER.md): three static (VG, DM, SR) and six dynamic (R, C, T, FP, SA, DP).
A question entry follows the R4D-Bench release schema: `id`, `benchmark`, `task` (full category
name), `video`, `source`, `som_image`, `question` (with `<obj_N>`), `question_raw`, `options`
(a list of option *values*) and `answer` (the value of the correct option, not its letter).
Values are mixed types in the release (ints, strings, None), so matching an answer to its option
is done by `answer_index`, which does not confuse 0 with False or "0" with 0.
"""

from __future__ import annotations

import string
from typing import Any, Sequence

SCHEMA_VERSION = 1
DATASET_FORMAT = "rgpt4d.synth4d"
BENCHMARK_NAME = "synth4d"

# abbreviation -> full task name as written in the R4D-Bench release
CATEGORIES: dict[str, str] = {
    "VG": "3D Video Grounding",
    "DM": "Dimensional Measurement",
    "SR": "Spatial Relation",
    "R": "Rotational",
    "C": "Counting",
    "T": "Translational",
    "FP": "False Positives",
    "SA": "Speed & Acceleration",
    "DP": "Displacement & Path Length",
}
STATIC_CATEGORIES = ("VG", "DM", "SR")
DYNAMIC_CATEGORIES = ("R", "C", "T", "FP", "SA", "DP")
# the evaluator's report, in this order
REPORT_COLUMNS = ("Avg", "Sta", "Dyn", "VG", "DM", "SR", "R", "C", "T", "FP", "SA", "DP")

_TASK_TO_ABBREV = {name.lower(): abbrev for abbrev, name in CATEGORIES.items()}
# spellings seen in the wild for the same task
_TASK_TO_ABBREV.update(
    {
        "dimension measurement": "DM",
        "false positive": "FP",
        "speed and acceleration": "SA",
        "displacement and path length": "DP",
        "3d grounding": "VG",
        "translation": "T",
        "rotation": "R",
    }
)

LETTERS = string.ascii_uppercase

PROMPT_PREAMBLE = (
    "The first image is a set-of-mark annotation of a key frame of the video, with boxes labelled "
    "<obj_1>, <obj_2>, ...; references to <obj_N> in the question correspond to those regions."
)
PROMPT_SUFFIX = "Answer with only the letter of the correct option."


def category_of(task: str) -> str:
    """Abbreviation (VG, DM, ...) for a task given as a full name or an abbreviation."""
    if not isinstance(task, str):
        raise ValueError(f"task must be a string, got {task!r}")
    key = task.strip()
    if key.upper() in CATEGORIES:
        return key.upper()
    abbrev = _TASK_TO_ABBREV.get(key.lower())
    if abbrev is None:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(CATEGORIES.values())}")
    return abbrev


def is_static(category: str) -> bool:
    return category in STATIC_CATEGORIES


def option_text(value: Any) -> str:
    """How an option value is shown to a model: None as 'None', numbers as written."""
    if value is None:
        return "None"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _same_value(a: Any, b: Any) -> bool:
    # bool is an int subclass: never let True match 1 or False match 0
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if a is None or b is None:
        return a is b
    numeric = (int, float)
    if isinstance(a, numeric) and isinstance(b, numeric):
        return a == b
    return type(a) is type(b) and a == b


def answer_index(options: Sequence[Any], answer: Any, *, entry_id: Any = None) -> int:
    """Index of `answer` in `options`: exact typed match first, then a text match.

    The text match (stripped, case-insensitive) covers releases where the answer is written as a
    string while the option is a number, e.g. answer "0" with option 0.
    """
    for i, value in enumerate(options):
        if _same_value(value, answer):
            return i
    wanted = option_text(answer).strip().lower()
    matches = [i for i, value in enumerate(options) if option_text(value).strip().lower() == wanted]
    if len(matches) == 1:
        return matches[0]
    where = f" in entry {entry_id!r}" if entry_id is not None else ""
    if not matches:
        raise ValueError(f"answer {answer!r} is not among the options {list(options)!r}{where}")
    raise ValueError(f"answer {answer!r} matches several options {list(options)!r}{where}")


def format_prompt(question: str, options: Sequence[Any]) -> str:
    """The evaluation prompt of R4D-Bench: preamble, question, '(A) ...' lines, instruction."""
    if len(options) > len(LETTERS):
        raise ValueError(f"too many options ({len(options)})")
    lines = [PROMPT_PREAMBLE, question]
    lines += [f"({LETTERS[i]}) {option_text(v)}" for i, v in enumerate(options)]
    lines.append(PROMPT_SUFFIX)
    return "\n".join(lines)
