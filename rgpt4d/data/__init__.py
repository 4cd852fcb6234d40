"""Synthetic 4D world, R4D-style questions, the R4D-Bench loader and evaluator.

Modules, in reading order: world (scenes and motion), render (ray caster), som (Set-of-Marks
images), questions (the nine categories), storage (shards + manifest), generate (`data make`),
dataset (torch datasets + collate), r4d_bench (the real release), evaluate (letters and the
12-column report), baseline (text-only shortcut check), show (contact sheet and stats), cli.

Names are imported lazily so that `rgpt4d data make` workers do not pay for torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "WorldConfig": "world",
    "Scene": "world",
    "SceneObject": "world",
    "Camera": "world",
    "Motion": "world",
    "sample_scene": "world",
    "render": "render",
    "Render": "render",
    "draw_som": "som",
    "TEMPLATES": "questions",
    "enumerate_answers": "questions",
    "assemble_questions": "questions",
    "MakeConfig": "generate",
    "make_dataset": "generate",
    "simulate_candidates": "generate",
    "Synth4DVideos": "dataset",
    "Synth4DQuestions": "dataset",
    "QuestionsByVideo": "dataset",
    "collate": "dataset",
    "R4DBench": "r4d_bench",
    "decode_video": "r4d_bench",
    "evaluate": "evaluate",
    "extract_letter": "evaluate",
    "Report": "evaluate",
    "text_only_check": "baseline",
    "CATEGORIES": "schema",
    "REPORT_COLUMNS": "schema",
    "format_prompt": "schema",
    "answer_index": "schema",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"rgpt4d.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'rgpt4d.data' has no attribute {name!r}")
