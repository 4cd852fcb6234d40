"""TrainConfig: everything a training run needs besides its data, with presets and a JSON round-trip.

Presets (`train_config(preset)`): the model preset of the same name (rgpt4d.models.configs) plus
optimisation defaults sized for it.

| preset | model | steps | global batch | lr | use |
|---|---|---|---|---|---|
| smoke | 4 frames of 32 px, 1-2 layer towers | 6 | 4 | 2e-3 | tests; seconds on a CPU |
| tiny  | 16 frames of 64 px (docs/models.md) | 1500 | 8 | 2e-3 | minutes on a CPU (the demo) |
| small | 16 frames of 112 px | 2000 | 32 | 3e-4 | a GPU |
| paper | the paper's shapes | 5 epochs | 1024 | 1e-5 | many GPUs (PAPER.md recipe) |

`p4d` picks the distillation terms of L = L_SFT + alpha*L_LD + beta*L_ED: "none" (plain SFT),
"latent" (L_LD only), "explicit" (L_ED only), "both" (the paper); alpha, beta and lambda_m come
from `loss_preset` ("paper": 0.5, 0.1, depth 1 / flow 0.1 / motion 0.05; "code": the released code).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rgpt4d.models.tokenizer import RESTATE_MODES

TRAIN_PRESETS = ("smoke", "tiny", "small", "paper")
P4D_MODES = ("none", "latent", "explicit", "both")
OPS_MODES = ("fused", "eager")
DEVICES = ("auto", "cpu", "cuda")
STRATEGIES = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    """One training run (teacher or student). `batch_size` is the global batch of one optimizer
    step: it is split over `grad_accum` micro-batches and over the processes of a distributed run
    (batch_size must be divisible by grad_accum * world size)."""

    preset: str = "smoke"            # model preset (rgpt4d.models.configs.get_preset)
    p4d: str = "both"                # none | latent | explicit | both
    tpe: bool = True                 # the student's timestamp positional encoding
    ops: str = "fused"               # fused (best backend of our kernels) | eager (the references)
    decoder: str = "mlp"             # D_4DP: mlp (paper) | linear (released code)
    answer_format: str = "auto"      # the SFT target: letter | option (text, then letter) | rank | auto (the preset's)
    restate: str = "auto"            # the question's regions restated: off | line (before <|assistant|>) | answer (after it) | auto
    questions_per_sequence: int = 1  # > 1: up to this many questions of one video per (multi-turn) sequence
    loss_preset: str = "paper"       # P4D weights: paper | code
    steps: int = 6                   # optimizer steps (0: derive from `epochs`)
    epochs: float = 0.0              # used when steps == 0: steps = ceil(epochs * len(train) / batch_size)
    batch_size: int = 4              # global batch per optimizer step
    grad_accum: int = 1              # micro-batches per optimizer step (per process)
    lr: float = 2e-3
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    warmup: float = 0.1              # < 1: fraction of the steps; >= 1: a number of steps
    min_lr_ratio: float = 0.0        # the cosine ends at lr * min_lr_ratio
    max_grad_norm: float = 1.0       # 0 or less: no clipping
    seed: int = 0
    device: str = "auto"             # auto (cuda if available) | cpu | cuda
    bf16: bool = True                # bf16 autocast on GPU (ignored on CPU: fp32 there)
    strategy: str = "ddp"            # several processes: ddp (replicas) | fsdp (FSDP2 shards; rgpt4d.train.fsdp)
    log_every: int = 1               # metrics.jsonl / progress bar every N steps
    ckpt_every: int = 0              # checkpoint every N steps (0: only at the end)
    keep_last: int = 3               # checkpoints kept
    num_workers: int = 0             # DataLoader workers
    teacher_lr: float = 1e-3         # teacher training (train_teacher) uses these three
    teacher_steps: int = 20
    teacher_batch_size: int = 4
    # the student's starting weights (docs/checkpoints.md): "" a new student of the preset; "nvila:PATH"
    # an NVILA folder (NVILA-Lite-8B, 4D-RGPT-8B); "parts": init_vision + init_llm + init_tokenizer
    # (Hugging Face SigLIP / Qwen2 / tokenizer folders; the tokenizer defaults to the LLM's folder)
    init_from: str = ""
    init_vision: str = ""
    init_llm: str = ""
    init_tokenizer: str = ""

    def __post_init__(self):
        self.betas = tuple(self.betas)
        self.validate()

    def validate(self) -> "TrainConfig":
        def choice(name, options):
            value = getattr(self, name)
            if value not in options:
                raise ValueError(f"TrainConfig.{name}: must be one of {list(options)}, got {value!r}")

        choice("preset", TRAIN_PRESETS)
        choice("p4d", P4D_MODES)
        choice("ops", OPS_MODES)
        choice("device", DEVICES)
        choice("strategy", STRATEGIES)
        choice("decoder", ("mlp", "linear"))
        choice("answer_format", ("auto", "letter", "option", "rank"))
        choice("restate", ("auto", "off", *RESTATE_MODES))
        choice("loss_preset", ("paper", "code"))
        for name in ("batch_size", "grad_accum", "log_every", "keep_last", "teacher_steps", "teacher_batch_size",
                     "questions_per_sequence"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"TrainConfig.{name}: must be an integer >= 1, got {v!r}")
        for name in ("steps", "ckpt_every", "seed", "num_workers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"TrainConfig.{name}: must be an integer >= 0, got {v!r}")
        if self.steps == 0 and not self.epochs > 0:
            raise ValueError(f"TrainConfig.steps: 0 means 'derive from epochs', but epochs is {self.epochs!r} "
                             "(give steps >= 1 or epochs > 0)")
        for name in ("lr", "teacher_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainConfig.{name}: must be > 0, got {getattr(self, name)!r}")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay: must be >= 0, got {self.weight_decay!r}")
        if self.warmup < 0:
            raise ValueError(f"TrainConfig.warmup: must be >= 0 (a fraction < 1 or a number of steps), "
                             f"got {self.warmup!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"TrainConfig.batch_size: {self.batch_size} is not divisible by grad_accum "
                             f"{self.grad_accum}")
        if len(self.betas) != 2:
            raise ValueError(f"TrainConfig.betas: expected two numbers, got {self.betas!r}")
        nvila = self.init_from.startswith("nvila:") and len(self.init_from) > len("nvila:")
        if self.init_from not in ("", "parts") and not nvila:
            raise ValueError(f"TrainConfig.init_from: must be '', 'nvila:PATH' or 'parts', got {self.init_from!r}")
        if self.init_from == "parts" and not (self.init_vision and self.init_llm):
            raise ValueError("TrainConfig.init_from: 'parts' needs init_vision and init_llm (folders)")
        return self

    # -- derived -------------------------------------------------------------------------------
    @property
    def latent(self) -> bool:
        return self.p4d in ("latent", "both")

    @property
    def explicit(self) -> bool:
        return self.p4d in ("explicit", "both")

    def warmup_steps(self, total: int) -> int:
        return int(round(self.warmup * total)) if self.warmup < 1 else int(self.warmup)

    # -- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"TrainConfig: unknown fields {unknown}; known: {sorted(names)}")
        return cls(**d)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


_PRESET_DEFAULTS = {
    "smoke": dict(steps=6, batch_size=4, lr=2e-3, warmup=0.2, teacher_steps=8, teacher_batch_size=4),
    "tiny": dict(steps=1500, batch_size=8, lr=2e-3, warmup=0.05, teacher_steps=300, teacher_batch_size=4),
    "small": dict(steps=2000, batch_size=32, lr=3e-4, warmup=0.03, teacher_steps=2000, teacher_batch_size=16,
                  ckpt_every=500),
    # the paper: lr 1e-5, cosine, warmup 0.03, global batch 1024, 5 epochs (PAPER.md, training recipe)
    "paper": dict(steps=0, epochs=5.0, batch_size=1024, grad_accum=16, lr=1e-5, warmup=0.03, weight_decay=0.0,
                  teacher_steps=20000, teacher_batch_size=64, teacher_lr=1e-4, ckpt_every=500, log_every=10),
}


def train_config(preset: str = "smoke", **overrides) -> TrainConfig:
    """The TrainConfig of a preset, with `overrides` (TrainConfig fields) applied."""
    if preset not in TRAIN_PRESETS:
        raise ValueError(f"preset: must be one of {list(TRAIN_PRESETS)}, got {preset!r}")
    kw = dict(_PRESET_DEFAULTS[preset], preset=preset)
    kw.update(overrides)
    return TrainConfig(**kw)
