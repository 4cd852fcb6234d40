"""No shortcuts: a text-only classifier trained on train questions scores at most chance + 5 points
on test questions, overall and per category; and the same classifier does find planted shortcuts.

Sizes: 800 videos per split (64x64, the default; only the first frame is rendered, which is all the
questions depend on), about 12,500 questions per split and at least ~600 test questions in every
category, so one standard error of a category's accuracy is at most ~1.8 points (+5 is > 2.8 SE).
"""

import collections

import pytest

from rgpt4d.data.baseline import text_only_check
from rgpt4d.data.generate import simulate_candidates
from rgpt4d.data.questions import assemble_questions
from rgpt4d.data.schema import CATEGORIES

VIDEOS_PER_SPLIT = 800


@pytest.fixture(scope="module")
def splits():
    train = assemble_questions(simulate_candidates(VIDEOS_PER_SPLIT, seed=2024), seed=2024, split="train")
    test = assemble_questions(
        simulate_candidates(VIDEOS_PER_SPLIT, seed=2024, start=VIDEOS_PER_SPLIT), seed=2024, split="test"
    )
    return train, test


def test_text_only_baseline_is_near_chance(splits):
    train, test = splits
    counts = collections.Counter(e["category"] for e in test)
    assert set(counts) == set(CATEGORIES) and min(counts.values()) >= 500, counts
    result = text_only_check(train, test)
    print("\n" + result.to_markdown())
    for key, margin in result.margin().items():
        assert margin <= 5.0, (
            f"{key}: text-only {result.accuracy[key]:.1f} vs chance {result.chance[key]:.1f}\n"
            + result.to_markdown()
        )


def test_the_baseline_finds_planted_shortcuts(splits):
    """Control: the classifier is strong enough to exploit a leak when one exists."""
    train, test = splits

    def plant(entries):
        out = []
        for e in entries:
            e = dict(e)
            if e["category"] in ("DM", "SA"):  # the answer is always the longest option
                others = sorted((o for o in e["options"] if o != e["answer"]), key=lambda o: len(str(o)))
                e["answer"] = str(e["answer"]) + " (approx.)"
                e["options"] = others[:1] + [e["answer"]] + others[1:]
            elif e["category"] == "T":  # the answer is always in position B
                others = [o for o in e["options"] if o != e["answer"]]
                e["options"] = others[:1] + [e["answer"]] + others[1:]
            out.append(e)
        return out

    result = text_only_check(plant(train[:4000]), plant(test[:4000]))
    for cat in ("DM", "SA", "T"):
        assert result.accuracy[cat] > 90.0, result.to_markdown()
    assert result.margin()["VG"] <= 5.0
