"""Shared fixtures of the training tests: one tiny synthetic set (4 frames of 32 px), one smoke
teacher trained for a few steps and its cache, made once per session.

Every test here runs torch with one thread: on a small shared machine, two intra-op threads
spin-wait on each other and the smoke model's tiny ops get ~50x slower.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.conftest import MODEL_STACK_MISSING, ModelStackSkipped  # noqa: E402


def pytest_pycollect_makemodule(module_path, parent):
    # every training test runs rgpt4d's model stack
    return ModelStackSkipped.from_parent(parent, path=module_path) if MODEL_STACK_MISSING is not None else None


@pytest.fixture(scope="session", autouse=True)
def _one_thread():  # session scope: it must come before the module-scoped runs, too
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory):
    """`rgpt4d data make`: 40 videos of 4 frames at 32 px, ~85 train, ~24 val and ~8 test questions."""
    from rgpt4d.cli import main

    out = tmp_path_factory.mktemp("smoke_data")
    assert main(["data", "make", "--out", str(out), "--num-videos", "40", "--frames", "4", "--size", "32",
                 "--workers", "1", "--min-objects", "2", "--max-objects", "4", "--val-fraction", "0.25",
                 "--test-fraction", "0.25", "--overwrite", "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def smoke_teacher_cache(smoke_data, tmp_path_factory):
    """A smoke teacher (2 steps) and its cache over every split: (teacher dir, cache dir)."""
    from rgpt4d.train import cache_teacher, train_config, train_teacher

    root = tmp_path_factory.mktemp("smoke_teacher")
    train_teacher(train_config("smoke", teacher_steps=2, teacher_batch_size=2), smoke_data, root / "teacher",
                  progress=False, log=None)
    cache_teacher(root / "teacher", smoke_data, root / "cache", progress=False)
    return root / "teacher", root / "cache"
