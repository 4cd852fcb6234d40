"""A text-only baseline: can the questions be answered without the video?

A conditional-logit classifier scores every option of a question from text alone and picks the
highest score. Its features cover the shortcuts a benchmark can leak: option words and bigrams,
option words crossed with the question's words (answer priors per question type), the option's
position, its length and length rank, and for numeric options the value's rank among the options
and its magnitude. Features are hashed into one weight vector, trained full-batch with Adam on
train.json and scored on test.json. A benchmark without shortcuts keeps it near chance
(the mean of 1 / number of options).
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from rgpt4d.data.schema import CATEGORIES, answer_index, category_of, option_text

_TOKEN = re.compile(r"[a-z]+|\d+(?:\.\d+)?|[^\sa-z\d]")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def _number(text: str) -> float | None:
    m = _NUMBER.search(text)
    return float(m.group(0)) if m else None


def option_features(question: str, question_raw: str, options: Sequence[Any]) -> list[list[str]]:
    """Feature strings for each option of one question."""
    texts = [option_text(o) for o in options]
    signature = " ".join(_tokens(question)[:6])  # identifies the question type
    # words only question_raw has: the object names (colour, shape)
    names = sorted(set(_tokens(question_raw)) - set(_tokens(question)))
    values = [_number(t) for t in texts]
    numeric = all(v is not None for v in values)
    ranks = np.argsort(np.argsort(values)) if numeric else None
    lengths = [len(t) for t in texts]
    len_ranks = np.argsort(np.argsort(lengths, kind="stable"), kind="stable")
    feats = []
    for j, t in enumerate(texts):
        toks = _tokens(t)
        units = toks + [" ".join(p) for p in zip(toks, toks[1:])] + ["=" + t.lower()]
        f = [f"o:{u}" for u in units]
        f += [f"qo:{q}|{u}" for q in [signature] + names for u in units]
        f += [f"pos:{j}", f"pos:{j}|{signature}", f"n:{len(texts)}|pos:{j}"]
        f += [f"len:{min(len(t) // 4, 12)}|{signature}", f"lenrank:{len_ranks[j]}|{signature}"]
        if numeric:
            v = values[j]
            f += [f"rank:{ranks[j]}|{signature}", f"rank:{ranks[j]}"]
            f += [f"mag:{math.floor(2 * math.log10(abs(v) + 1e-3))}|{signature}"]
        feats.append(f)
    return feats


def _hash(feature: str, dim: int) -> int:
    return zlib.crc32(feature.encode()) % dim


@dataclass
class Encoded:
    indices: np.ndarray  # flat feature ids, option after option
    option_of: np.ndarray  # option number of each feature id
    question_of: np.ndarray  # question number of each option
    answers: np.ndarray  # [Q] index of the correct option within its question
    first_option: np.ndarray  # [Q] number of each question's first option
    categories: list[str]


def encode(entries: Sequence[dict[str, Any]], dim: int) -> Encoded:
    idx: list[int] = []
    option_of: list[int] = []
    question_of: list[int] = []
    answers, first, cats = [], [], []
    cache: dict[str, int] = {}  # feature strings repeat a lot across questions
    for qi, e in enumerate(entries):
        feats = option_features(e["question"], e.get("question_raw", e["question"]), e["options"])
        first.append(len(question_of))
        for f in feats:
            option_of.extend([len(question_of)] * len(f))
            for x in f:
                h = cache.get(x)
                if h is None:
                    h = cache[x] = _hash(x, dim)
                idx.append(h)
            question_of.append(qi)
        answers.append(answer_index(e["options"], e["answer"], entry_id=e.get("id")))
        cats.append(category_of(e["task"]))
    return Encoded(
        np.asarray(idx, dtype=np.int64),
        np.asarray(option_of, dtype=np.int64),
        np.asarray(question_of, dtype=np.int64),
        np.asarray(answers, dtype=np.int64),
        np.asarray(first, dtype=np.int64),
        cats,
    )


class TextOnlyBaseline:
    """Multinomial logistic regression over options with hashed features, trained full-batch with
    Adam in numpy (a few hundred steps converge; no threads, so it behaves on a busy machine)."""

    def __init__(self, dim: int = 1 << 18, steps: int = 200, lr: float = 0.1, l2: float = 1e-5):
        self.dim, self.steps, self.lr, self.l2 = dim, steps, lr, l2
        self.w = np.zeros(dim, dtype=np.float64)

    def _option_scores(self, enc: Encoded) -> np.ndarray:
        return np.bincount(enc.option_of, weights=self.w[enc.indices], minlength=len(enc.question_of))

    @staticmethod
    def _softmax(scores: np.ndarray, enc: Encoded) -> np.ndarray:
        q = enc.question_of
        top = np.full(len(enc.answers), -np.inf)
        np.maximum.at(top, q, scores)
        ex = np.exp(scores - top[q])
        return ex / np.bincount(q, weights=ex, minlength=len(enc.answers))[q]

    def fit(self, entries: Sequence[dict[str, Any]]) -> "TextOnlyBaseline":
        enc = encode(entries, self.dim)
        target = np.zeros(len(enc.question_of))
        target[enc.first_option + enc.answers] = 1.0
        m = np.zeros_like(self.w)
        v = np.zeros_like(self.w)
        b1, b2, n = 0.9, 0.999, len(enc.answers)
        for step in range(1, self.steps + 1):
            p = self._softmax(self._option_scores(enc), enc)
            g_opt = (p - target) / n  # d mean cross-entropy / d option score
            grad = (
                np.bincount(enc.indices, weights=g_opt[enc.option_of], minlength=self.dim) + self.l2 * self.w
            )
            m = b1 * m + (1 - b1) * grad
            v = b2 * v + (1 - b2) * grad * grad
            self.w -= self.lr * (m / (1 - b1**step)) / (np.sqrt(v / (1 - b2**step)) + 1e-8)
        return self

    def predict(self, entries: Sequence[dict[str, Any]]) -> np.ndarray:
        enc = encode(entries, self.dim)
        scores = self._option_scores(enc)
        out = np.empty(len(enc.answers), dtype=np.int64)
        for qi in range(len(enc.answers)):
            lo = enc.first_option[qi]
            hi = enc.first_option[qi + 1] if qi + 1 < len(enc.answers) else len(scores)
            out[qi] = int(np.argmax(scores[lo:hi]))
        return out


@dataclass
class BaselineResult:
    accuracy: dict[str, float]  # percent, "All" and per category
    chance: dict[str, float]  # percent
    counts: dict[str, int]
    train_questions: int

    def margin(self) -> dict[str, float]:
        return {k: self.accuracy[k] - self.chance[k] for k in self.accuracy}

    def to_markdown(self) -> str:
        keys = ["All"] + [c for c in CATEGORIES if c in self.accuracy]
        lines = ["| | " + " | ".join(keys) + " |", "|---|" + "|".join("---:" for _ in keys) + "|"]
        lines.append("| text-only | " + " | ".join(f"{self.accuracy[k]:.1f}" for k in keys) + " |")
        lines.append("| chance | " + " | ".join(f"{self.chance[k]:.1f}" for k in keys) + " |")
        lines.append("| questions | " + " | ".join(str(self.counts[k]) for k in keys) + " |")
        return "\n".join(lines) + f"\n\ntrained on {self.train_questions} questions"


def text_only_check(
    train: Sequence[dict[str, Any]], test: Sequence[dict[str, Any]], steps: int = 200
) -> BaselineResult:
    """Train the text-only baseline on `train`, score it on `test`, per category and overall."""
    if not train or not test:
        raise ValueError(
            f"text-only check needs questions in both splits (train {len(train)}, test {len(test)})"
        )
    model = TextOnlyBaseline(steps=steps).fit(train)
    pred = model.predict(test).tolist()
    truth = [answer_index(e["options"], e["answer"], entry_id=e.get("id")) for e in test]
    cats = [category_of(e["task"]) for e in test]
    acc, chance, counts = {}, {}, {}
    for key in ["All"] + list(CATEGORIES):
        sel = [i for i, c in enumerate(cats) if key == "All" or c == key]
        if not sel:
            continue
        counts[key] = len(sel)
        acc[key] = 100.0 * sum(pred[i] == truth[i] for i in sel) / len(sel)
        chance[key] = 100.0 * sum(1.0 / len(test[i]["options"]) for i in sel) / len(sel)
    return BaselineResult(acc, chance, counts, len(train))
