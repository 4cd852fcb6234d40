"""Student training (L = L_SFT + alpha * L_LD + beta * L_ED) and evaluation.

    from rgpt4d.train import train_config, train_student, evaluate_student
    res = train_student(train_config("smoke", p4d="both"), "data/synth", "runs/teacher_cache", "runs/student")
    report = evaluate_student(res["model_path"], "data/synth", split="test")

Inputs: questions of `data_dir`'s train split (rgpt4d.data.Synth4DQuestions), teacher targets
from the cache `rgpt4d teacher cache` wrote (rgpt4d.train.teacher_cache.load_cached), the
teacher's frozen heads from the teacher folder the cache names (or `teacher=`). The trained model
is RGPT4DForP4DTraining (student + D_4DP + frozen heads); what is saved in `<out>/model/` is the
bare student (no teacher, no D_4DP) with its tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as tdist
from torch import nn
from transformers import PreTrainedTokenizerFast

from rgpt4d.data import QuestionsByVideo, Synth4DQuestions, collate
from rgpt4d.data.evaluate import evaluate, load_questions
from rgpt4d.infer import RGPT4D, save_inference_model
from rgpt4d.models.configs import P4DConfig, get_preset, student_config
from rgpt4d.models.loaders import load_nvila, load_parts
from rgpt4d.models.p4d import P4DOutput, RGPT4DForP4DTraining
from rgpt4d.models.student import RGPT4DForConditionalGeneration
from rgpt4d.models.teacher import Teacher4D
from rgpt4d.models.tokenizer import train_tokenizer
from rgpt4d.ops import P4D_PRESETS
from rgpt4d.train.config import TrainConfig
from rgpt4d.train.fsdp import student_state_dict
from rgpt4d.train.inputs import batch_to_inputs
from rgpt4d.train.loop import (add_nvtx_hooks, barrier, ops_backend, resolve_device, run_loop,
                               setup_distributed, total_steps)
from rgpt4d.train.teacher_cache import load_cached


class SFTOnly(nn.Module):
    """The student trained with L_SFT alone (p4d="none"): no teacher, no D_4DP."""

    def __init__(self, student):
        super().__init__()
        self.student = student

    def inference_model(self):
        return self.student

    def forward(self, *, teacher_targets=None, return_logits: bool = False, **student_inputs):
        # L_SFT through the fused LM head + cross-entropy unless the logits are asked for (as RGPT4DForP4DTraining)
        out = self.student(**student_inputs, return_logits=return_logits)
        if out.loss is None:
            raise ValueError("labels: training needs labels (the answer tokens) for L_SFT")
        return P4DOutput(loss=out.loss, sft_loss=out.loss, logits=out.logits)


class StudentCollate:
    """Collated questions -> the model's inputs (tokens with labels, frames, boxes, teacher targets).
    A class (not a closure) so DataLoader workers can pickle it."""

    def __init__(self, tokenizer, student_config, teacher_cache: Optional[str], p4d: bool):
        self.tokenizer, self.config, self.cache, self.p4d = tokenizer, student_config, teacher_cache, p4d

    def __call__(self, items: list[dict]) -> dict:
        batch = collate(items)
        inputs = batch_to_inputs(batch, self.tokenizer, self.config)
        if self.p4d:
            inputs["teacher_targets"] = load_cached(self.cache, batch["video_id"])
        return inputs


class StudentLoss:
    """loss_fn for run_loop: the total loss, its terms (L_SFT, L_LD, L_ED = sum_m lambda_m L_m), tokens."""

    def __init__(self, loss_preset: str):
        self.head_weights = dict(P4D_PRESETS[loss_preset].head_weights)

    def __call__(self, model: nn.Module, batch: dict):
        out = model(**batch)
        terms = {"loss_sft": out.sft_loss.detach()}
        if out.terms:
            zero = out.sft_loss.new_zeros(())
            terms["loss_ld"] = out.terms.get("latent", zero)
            terms["loss_ed"] = sum((self.head_weights.get(k, 0.0) * v for k, v in out.terms.items() if k != "latent"),
                                   zero)
        else:
            terms["loss_ld"] = terms["loss_ed"] = 0.0
        return out.loss, terms, int(batch["attention_mask"].sum())


def _tokenizer(out_dir: Path, vocab_size: int, dist):
    """The run's tokenizer: trained once (offline) by rank 0 and kept in <out>/tokenizer, so every
    process and a resumed run use the very same one."""
    path = out_dir / "tokenizer"
    if dist.main and not (path / "tokenizer.json").exists():
        train_tokenizer(vocab_size=vocab_size).save_pretrained(path)
    barrier(dist)
    return PreTrainedTokenizerFast.from_pretrained(path)


def _teacher_dir(teacher_cache: Path, teacher: Optional[str]) -> Path:
    if teacher is not None:
        return Path(teacher)
    index = teacher_cache / "cache_index.json"
    if not index.exists():
        raise FileNotFoundError(f"teacher_cache: {teacher_cache} has no cache_index.json (write it with "
                                "`rgpt4d teacher cache`)")
    return Path(json.loads(index.read_text())["teacher"])


def _check_frames(dataset, num_frames: int, preset: str) -> None:
    if len(dataset) == 0:
        raise ValueError(f"data: no train questions in {dataset.root}")
    frames = len(dataset.videos[dataset.entries[0]["video"]]["timestamps"])
    if frames != num_frames:
        raise ValueError(f"data: videos in {dataset.root} have {frames} frames but the {preset!r} student takes "
                         f"{num_frames}; make the data with `rgpt4d data make --frames {num_frames}`")


def _check_cache(teacher_cache: Path, video_ids: set[str]) -> None:
    missing = sorted(v for v in video_ids if not (teacher_cache / f"{v}.safetensors").exists())
    if missing:
        raise FileNotFoundError(f"teacher_cache: {len(missing)} training video(s) not cached in {teacher_cache}, "
                                f"e.g. {missing[:3]} (run `rgpt4d teacher cache` on this data)")


def _student_overrides(config: TrainConfig) -> dict:
    overrides = {} if config.answer_format == "auto" else {"answer_format": config.answer_format}
    if config.restate == "off":
        overrides["restate_regions"] = False
    elif config.restate != "auto":
        overrides.update(restate_regions=True, restate_position=config.restate)
    return dict(overrides, tpe=config.tpe)


def pretrained_student(config: TrainConfig):
    """(student, tokenizer) from config.init_from (rgpt4d.models.loaders; docs/checkpoints.md), with
    the preset's frame count and the run's TPE / answer settings."""
    torch.manual_seed(config.seed)  # the new projector / region encoder
    overrides = dict(_student_overrides(config), num_frames=student_config(config.preset).num_frames)
    if config.init_from.startswith("nvila:"):
        return load_nvila(config.init_from[len("nvila:"):], **overrides)
    return load_parts(config.init_vision, config.init_llm, config.init_tokenizer or config.init_llm, **overrides)


def build_training_model(config: TrainConfig, tokenizer, teacher_cache: Optional[str | Path] = None,
                         teacher: Optional[str | Path] = None, student: Optional[nn.Module] = None) -> nn.Module:
    """The model a student run trains: RGPT4DForP4DTraining, or SFTOnly for p4d="none". `student`:
    a student to train (pretrained_student's), instead of a new one of the preset."""
    preset = get_preset(config.preset)
    torch.manual_seed(config.seed)
    if student is None:
        student = RGPT4DForConditionalGeneration(student_config(preset, tokenizer, **_student_overrides(config)))
    if config.p4d == "none":
        return SFTOnly(student)
    if teacher_cache is None:
        raise ValueError(f"teacher_cache: p4d={config.p4d!r} needs the teacher cache (`rgpt4d teacher cache`); "
                         "use p4d='none' to train without distillation")
    t = Teacher4D.load(_teacher_dir(Path(teacher_cache), None if teacher is None else str(teacher)))
    if t.config.num_frames != student.config.num_frames:
        raise ValueError(f"teacher: it takes {t.config.num_frames} frames, the {config.preset!r} student "
                         f"{student.config.num_frames}; train the teacher with the same preset")
    p4d = P4DConfig(decoder=config.decoder, hidden_size=preset.p4d.hidden_size, loss_preset=config.loss_preset,
                    latent=config.latent, explicit=config.explicit)
    return RGPT4DForP4DTraining(student, t, p4d)


def _save_model(model, tokenizer, path: Path, config: TrainConfig, dist) -> Optional[str]:
    """The inference student as one save_pretrained folder (rank 0; under FSDP every process takes
    part in gathering the shards). Returns the path on rank 0."""
    state_dict = None
    if config.strategy == "fsdp" and dist.world > 1:
        state_dict = student_state_dict(model)
    if not dist.main:
        return None
    return str(save_inference_model(model, tokenizer, path, state_dict=state_dict))


def train_student(config: TrainConfig, data_dir: str | Path, teacher_cache: Optional[str | Path] = None,
                  out_dir: str | Path = "runs/student", *, resume: bool = False, progress: bool = True,
                  teacher: Optional[str | Path] = None, stop_at_step: Optional[int] = None,
                  log: Optional[Callable[[str], None]] = print) -> dict[str, Any]:
    """Train a student on `data_dir`'s train split; see docs/training.md.

    Writes `<out_dir>/metrics.jsonl`, `<out_dir>/config.json`, checkpoints in
    `<out_dir>/checkpoints/` and, when all config.steps are done, the inference student in
    `<out_dir>/model/` (save_pretrained + tokenizer). `resume`: continue from the newest valid
    checkpoint. `stop_at_step`: stop (and checkpoint) after that step, as if interrupted.

    Returns {"steps", "seconds", "tokens_per_s", "loss", "loss_sft", "loss_ld", "loss_ed" (last
    logged values), "model_path" (None if stopped early), "checkpoint", "metrics_path",
    "resumed_from"}.
    """
    config = config.validate()
    out_dir = Path(out_dir)
    dataset = Synth4DQuestions(data_dir, "train", fields=("rgb",))
    if config.questions_per_sequence > 1:
        dataset = QuestionsByVideo(dataset, config.questions_per_sequence, seed=config.seed)
    _check_frames(dataset, student_config(config.preset).num_frames, config.preset)
    if config.p4d != "none":
        if teacher_cache is None:
            raise ValueError(f"teacher_cache: p4d={config.p4d!r} needs the teacher cache (`rgpt4d teacher cache`); "
                             "use p4d='none' to train without distillation")
        _check_cache(Path(teacher_cache), {e["video"] for e in dataset.entries})
    device = resolve_device(config)
    dist = setup_distributed(device)
    try:
        with ops_backend(config.ops):
            student = None
            if config.init_from:
                student, tokenizer = pretrained_student(config)
            else:
                tokenizer = _tokenizer(out_dir, get_preset(config.preset).tokenizer_vocab_size, dist)
            model = build_training_model(config, tokenizer, teacher_cache, teacher, student).to(device)
            student = model.inference_model()
            add_nvtx_hooks({"vision": student.vision_tower, "projector": student.projector,
                            "regions": student.region_encoder, "llm": student.language_model.model,
                            "p4d_decoder": getattr(model, "decoder", None),
                            "p4d_loss": getattr(model, "loss_fn", None)})
            collate_fn = StudentCollate(tokenizer, student.config, None if teacher_cache is None else str(teacher_cache),
                                     config.p4d != "none")
            res = run_loop(model, dataset, collate_fn, StudentLoss(config.loss_preset), config, out_dir, lr=config.lr,
                           name="student", resume=resume, progress=progress, stop_at_step=stop_at_step,
                           metadata={"data_dir": str(data_dir), "teacher_cache": str(teacher_cache)}, dist=dist,
                           device=device, log=log)
            model_path = None
            if res.steps >= total_steps(len(dataset), config, dist.world):
                model_path = _save_model(model, tokenizer, out_dir / "model", config, dist)
        result = {"steps": res.steps, "seconds": res.seconds, "tokens_per_s": res.tokens_per_s,
                  **{k: res.last.get(k) for k in ("loss", "loss_sft", "loss_ld", "loss_ed")},
                  "model_path": model_path, "checkpoint": res.checkpoint,
                  "metrics_path": str(out_dir / "metrics.jsonl"), "resumed_from": res.resumed_from}
        if dist.main:
            (out_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if dist.started_here:
            tdist.destroy_process_group()
    return result


def evaluate_student(model_path: str | Path, data_dir: str | Path, split: str = "test", *, batch_size: int = 8,
                     limit: Optional[int] = None, device: str = "cpu", progress: bool = False,
                     predictions_out: Optional[str | Path] = None, unparseable: str = "wrong",
                     scoring: str = "auto") -> dict[str, Any]:
    """Answer `split` of `data_dir` with the saved student and score it (rgpt4d.data.evaluate).
    `scoring`: how answers are read (rgpt4d.infer.RGPT4D.answer_batch; "auto": the model's own).

    Returns {"scores": {Avg, Sta, Dyn, VG, DM, SR, R, C, T, FP, SA, DP} (percent, None for a
    category without questions), "counts", "unparseable", "missing", "markdown", "split"}.
    """
    questions = load_questions(Path(data_dir) / f"{split}.json")
    if limit is not None:
        questions = questions[:limit]
    if not questions:
        raise ValueError(f"data: no {split} questions in {data_dir}")
    model = RGPT4D.from_pretrained(model_path, device=device)
    preds = model.answer_dataset(data_dir, split, predictions_out, batch_size=batch_size, limit=len(questions),
                                 progress=progress, scoring=scoring)
    report = evaluate(questions, {p["id"]: p["prediction"] for p in preds}, unparseable=unparseable)
    return {**report.to_json(), "markdown": report.to_markdown(), "split": split,
            "scoring": model.default_scoring() if scoring == "auto" else scoring}
