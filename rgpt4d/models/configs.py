"""Configurations of the 4D-RGPT models, and the presets `smoke`, `tiny`, `small` and `paper`.

Every model is built from these configs: no weights are downloaded. `smoke` (4 frames of 32 px,
one- and two-layer towers) trains in seconds and is what the training tests use; `tiny` trains in minutes on
2 CPU cores (64x64 videos of the synthetic set); `small` is a few times wider; `paper` has the
shapes of the released checkpoints (NVILA-Lite-8B / 4D-RGPT-8B, docs/checkpoints.md: SigLIP so400m
patch 14 at 448 px, 32x32 -> 11x11 tokens per frame, features of its second-to-last layer, NVILA's
projector LayerNorm(10368) -> 3456 -> LayerNorm -> 3584 -> 3584, Qwen2-7B 3584 x 28 layers, a "\n"
token after each frame; teacher L4P's VideoMAEv2 1408 wide, 40 layers, 8 x 16 x 16 latent, heads on
layers 14/21/28/36). Building `paper` allocates ~8B parameters: only do it where that fits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers 4.x spells it PretrainedConfig
    from transformers import PretrainedConfig as PreTrainedConfig

from rgpt4d.models.tokenizer import ANSWER_FORMATS, RESTATE_MODES, single_token_id, special_token_ids

PRESETS = ("smoke", "tiny", "small", "paper")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "xformers")
REGION_MODES = ("tokens", "som", "both", "none")
# "mlp": Linear -> GELU -> Linear after the fused prologue (the paper's 2-layer MLP); "nvila": NVILA's
# mlp_downsample_3x3_fix after the prologue: Linear -> GELU -> LayerNorm -> Linear -> GELU -> Linear
PROJECTOR_TYPES = ("mlp", "nvila")
TPE_KINDS = ("sinusoidal", "learned")
DECODER_KINDS = ("mlp", "linear")
# the teacher heads of the presets: L4P's four explicit signals (depth, backward flow, motion mask,
# Plücker camera rays), every one distilled by P4D's paper loss
ALL_HEADS = ("depth", "flow", "motion", "camray")


# ---------------------------------------------------------------------------------------------
# Teacher (frozen 4D perception model, L4P-like)
# ---------------------------------------------------------------------------------------------


@dataclass
class TeacherConfig:
    """VideoMAE encoder (tubelet 2) + DPT-like heads reading four encoder layers."""

    image_size: int = 64
    patch_size: int = 8
    num_frames: int = 16
    tubelet_size: int = 2
    hidden_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 128
    head_layers: tuple = (1, 2, 3, 4)  # 1-based encoder layers the heads read (the latent is the last)
    head_features: int = 32  # DPT fusion width
    heads: tuple = ("depth", "flow", "motion")  # of rgpt4d.models.teacher.HEAD_SPECS (the presets add "camray")
    # DPT pyramid, in multiples of the token grid: fusion runs from the coarsest map up to the finest,
    # whose output is unfolded to pixels by a learned pixel shuffle (patch_size / head_scales[0] pixels
    # per side), so no convolution runs at full resolution
    head_scales: tuple = (2.0, 1.0, 0.5, 0.25)
    # the encoder also sees each frame's difference to the previous frame (3 more input channels):
    # motion that crosses a tubelet boundary is then in the input, not only in attention across time
    difference_channels: bool = True
    # the encoder also sees a Lucas-Kanade estimate of each frame's backward flow (2 more input
    # channels, pixels; rgpt4d.models.teacher.flow_cue). Flow is a second-order function of the
    # pixels (brightness constancy: dI/dt = grad I . u), which a small encoder trained from scratch
    # for a few hundred steps does not discover: without this cue its flow head stays at zero flow.
    # Saved configs without the field are read as False (the teachers trained before it existed).
    flow_cue: bool = True
    flow_cue_window: int = 9  # pixels: side of the box window the Lucas-Kanade sums run over

    @property
    def grid(self) -> tuple[int, int, int]:
        """The latent grid (T', h, w) = (frames / tubelet, size / patch, size / patch)."""
        g = self.image_size // self.patch_size
        return (self.num_frames // self.tubelet_size, g, g)

    def videomae_kwargs(self) -> dict[str, Any]:
        return dict(image_size=self.image_size, patch_size=self.patch_size, num_frames=self.num_frames,
                    tubelet_size=self.tubelet_size, hidden_size=self.hidden_size,
                    num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                    intermediate_size=self.intermediate_size, use_mean_pooling=False,
                    num_channels=self.input_channels)

    @property
    def input_channels(self) -> int:
        """RGB, plus the difference to the previous frame (3), plus the flow cue (2)."""
        return 3 + 3 * bool(self.difference_channels) + 2 * bool(self.flow_cue)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TeacherConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"TeacherConfig: unknown fields {unknown}")
        d = {"flow_cue": False, **d}  # saved before the flow cue existed: the weights expect no cue channels
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"TeacherConfig: image_size {self.image_size} is not a multiple of patch_size "
                             f"{self.patch_size}")
        if self.num_frames % self.tubelet_size:
            raise ValueError(f"TeacherConfig: num_frames {self.num_frames} is not a multiple of tubelet_size "
                             f"{self.tubelet_size}")
        up = self.patch_size / self.head_scales[0] if len(self.head_scales) == 4 and self.head_scales[0] > 0 else 0.5
        if len(self.head_scales) != 4 or up < 1 or up != int(up):
            raise ValueError(f"TeacherConfig: head_scales must be four scales whose first divides patch_size "
                             f"{self.patch_size} into a whole number of pixels, got {self.head_scales}")
        if self.flow_cue_window < 1 or self.flow_cue_window % 2 == 0:
            raise ValueError(f"TeacherConfig: flow_cue_window must be an odd number of pixels, "
                             f"got {self.flow_cue_window}")
        if len(self.head_layers) != 4 or not all(1 <= i <= self.num_hidden_layers for i in self.head_layers):
            raise ValueError(f"TeacherConfig: head_layers must be four layers in 1..{self.num_hidden_layers}, "
                             f"got {self.head_layers}")


# ---------------------------------------------------------------------------------------------
# P4D (training-only decoder D_4DP and losses)
# ---------------------------------------------------------------------------------------------


@dataclass
class P4DConfig:
    """D_4DP and the loss. decoder="mlp": the paper's 3-layer MLP (GELU, Xavier, zero bias) to one
    latent; decoder="linear": the released code's one Linear per teacher head layer."""

    decoder: str = "mlp"
    hidden_size: int = 256  # the paper: 2560
    loss_preset: str = "paper"  # "paper" | "code" (rgpt4d.ops.P4DLoss)
    latent: bool = True  # L_LD
    explicit: bool = True  # L_ED through the teacher's frozen heads
    linear_init_std: float = 0.1  # the released code's init of the per-layer Linear

    def __post_init__(self):
        if self.decoder not in DECODER_KINDS:
            raise ValueError(f"P4DConfig: decoder must be one of {DECODER_KINDS}, got {self.decoder!r}")
        if self.loss_preset not in ("paper", "code"):
            raise ValueError(f"P4DConfig: loss_preset must be 'paper' or 'code', got {self.loss_preset!r}")


# ---------------------------------------------------------------------------------------------
# Student (the deployed MLLM)
# ---------------------------------------------------------------------------------------------


class RGPT4DConfig(PreTrainedConfig):
    """The student MLLM: SigLIP vision tower -> TPE + window downsample + LayerNorm (one fused op)
    -> 2-layer MLP projector -> Qwen2 causal LM, with region tokens at `<obj_N>`.

    vision_config / text_config are the kwargs of transformers' SiglipVisionConfig / Qwen2Config.
    """

    model_type = "rgpt4d"

    vision_config: dict | None = None
    text_config: dict | None = None
    num_frames: int = 16
    downsample_window: int = 3
    projector_hidden_size: int = 256
    projector_type: str = "mlp"  # PROJECTOR_TYPES
    # which SigLIP hidden state feeds the projector: None is `last_hidden_state` (after the tower's
    # final LayerNorm); an int k is `hidden_states[k]` (NVILA: -2, the second-to-last layer's output)
    vision_select_layer: int | None = None
    # a token placed after each frame's visual tokens in the prompt (NVILA: the "\n" token); None: none
    frame_separator_id: int | None = None
    tpe: bool = True  # a TPE on the visual features before the projector (and in the region encoder)
    tpe_kind: str = "sinusoidal"  # "sinusoidal": the paper's, of the seconds; "learned": a table row per frame index
    tpe_base: float = 10000.0
    region_mode: str = "tokens"  # "tokens" (RegionalEncoder4D at <obj_N>) | "som" | "both" | "none"
    max_regions: int = 8
    region_hidden_size: int = 256
    # region tokens: add an embedding of the box geometry and of the region's change over time
    # (RegionTokenEncoder); off in the paper's shapes, on in the from-scratch presets
    region_geometry: bool = False
    region_motion: bool = False
    region_relative: bool = False  # pool relative to the frame mean, then LayerNorm (RegionTokenEncoder)
    freeze_vision: bool = True
    image_token_id: int = 0
    obj_token_ids: list | None = None  # token id of <obj_1>, <obj_2>, ...
    attn_implementation_name: str = "sdpa"
    # what the student is fine-tuned to answer (rgpt4d.models.tokenizer.answer_ids): "letter" (the
    # option's letter, as R4D-Bench asks), or "option" (the option's text, then its letter in
    # parentheses). A small LLM trained from scratch cannot bind letters to options; with "option" it
    # is scored by the likelihood of each option's text (rgpt4d.infer), see docs/results/README.md.
    # "rank": as "option", except that a question whose options are all plain numbers in one unit
    # ("2.4 m") is answered with the chosen value's rank among them ("second smallest"), not its
    # digits (rgpt4d.models.tokenizer.answer_text).
    answer_format: str = "letter"
    # end every prompt with a line naming the regions its question refers to (`Regions: <obj_2>`,
    # rgpt4d.models.tokenizer.restate_regions), right before the answer: a from-scratch LLM then reads
    # the region tokens from next to the answer (docs/models.md). Off in `paper` (the R4D-Bench prompt).
    restate_regions: bool = False
    # where the restated regions go (with restate_regions): "line" (a `Regions: <obj_2>` line that
    # ends the prompt, before `<|assistant|>`) or "answer" (the region tokens right after
    # `<|assistant|>`: the answer's first token is predicted at the region token's own position, so
    # reading it needs no attention hop; docs/results/README.md). A saved config without this field
    # reads as "line".
    restate_position: str = "line"

    def restate_mode(self):
        """False, "line" or "answer": the `restate` argument of rgpt4d.models.tokenizer.encode_batch."""
        return self.restate_position if self.restate_regions else False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.tpe_kind not in TPE_KINDS:
            raise ValueError(f"RGPT4DConfig: tpe_kind must be one of {TPE_KINDS}, got {self.tpe_kind!r}")
        if self.restate_position not in RESTATE_MODES:
            raise ValueError(f"RGPT4DConfig: restate_position must be one of {RESTATE_MODES}, got {self.restate_position!r}")
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(f"RGPT4DConfig: answer_format must be one of {ANSWER_FORMATS}, got {self.answer_format!r}")
        if self.region_mode not in REGION_MODES:
            raise ValueError(f"RGPT4DConfig: region_mode must be one of {REGION_MODES}, got {self.region_mode!r}")
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"RGPT4DConfig: projector_type must be one of {PROJECTOR_TYPES}, "
                             f"got {self.projector_type!r}")
        if self.attn_implementation_name not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"RGPT4DConfig: attn_implementation_name must be one of {ATTN_IMPLEMENTATIONS}, "
                             f"got {self.attn_implementation_name!r}")

    # the grids the model works on
    @property
    def image_size(self) -> int:
        return int(self.vision_config["image_size"])

    @property
    def patch_grid(self) -> int:
        return self.image_size // int(self.vision_config["patch_size"])

    @property
    def tokens_per_image(self) -> int:
        g = -(-self.patch_grid // self.downsample_window)
        return g * g

    @property
    def num_visual_inputs(self) -> int:
        """Images embedded per prompt: the frames, plus the SoM image (first) when it is used."""
        return self.num_frames + (1 if self.region_mode in ("som", "both") else 0)

    @property
    def num_visual_tokens(self) -> int:
        """`<image>` placeholders in a prompt: all frames, plus the SoM image when it is used."""
        return self.num_visual_inputs * self.tokens_per_image

    def visual_token_ids(self) -> list[int]:
        """The prompt's visual block (rgpt4d.models.tokenizer.encode_batch): per image, its
        `tokens_per_image` `<image>` ids, then the frame separator when the config has one."""
        per = [self.image_token_id] * self.tokens_per_image
        if self.frame_separator_id is not None:
            per = per + [self.frame_separator_id]
        return per * self.num_visual_inputs

    def prompt_visual(self):
        """encode_batch's visual argument for this model: the number of `<image>` tokens (then the
        text "\n"), or with a frame separator the whole visual block (`visual_token_ids`; the
        prompt's text follows it directly, as in NVILA)."""
        return self.num_visual_tokens if self.frame_separator_id is None else self.visual_token_ids()


@dataclass
class Preset:
    name: str
    student: dict = field(default_factory=dict)  # RGPT4DConfig kwargs (without token ids)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    p4d: P4DConfig = field(default_factory=P4DConfig)
    tokenizer_vocab_size: int = 1000


# students trained from scratch here (no pretrained LLM can be downloaded): they answer with the option's
# text, a number by its rank among the options (read by likelihood: a small LLM trained from scratch does
# not learn to bind letters to options, nor to spell a perceived value); their region tokens stand out
# from the frame, and carry the box geometry and the region's change over time; the question's regions
# are repeated right after `<|assistant|>`, where the answer's first token is predicted
# (docs/results/README.md)
_FROM_SCRATCH = dict(answer_format="rank", region_geometry=True, region_motion=True, region_relative=True,
                     restate_regions=True, restate_position="answer")


def _qwen2(hidden: int, layers: int, heads: int, kv: int, inter: int, max_pos: int = 4096) -> dict:
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                intermediate_size=inter, max_position_embeddings=max_pos, tie_word_embeddings=False,
                rms_norm_eps=1e-6)


def _siglip(hidden: int, layers: int, heads: int, inter: int, image: int, patch: int) -> dict:
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter,
                image_size=image, patch_size=patch, vision_use_head=False)


def get_preset(name: str) -> Preset:
    """`smoke` | `tiny` | `small` | `paper`. Only configurations: nothing is allocated."""
    if name == "smoke":
        return Preset(
            name,
            student=dict(vision_config=_siglip(32, 1, 2, 64, 32, 8), text_config=_qwen2(64, 2, 4, 2, 128, 1024),
                         num_frames=4, projector_hidden_size=64, region_hidden_size=32,
                         **_FROM_SCRATCH),
            teacher=TeacherConfig(image_size=32, patch_size=8, num_frames=4, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, head_layers=(1, 1, 2, 2),
                                  head_features=16, heads=ALL_HEADS),
            p4d=P4DConfig(hidden_size=64),
            tokenizer_vocab_size=600,
        )
    if name == "tiny":
        return Preset(
            name,
            student=dict(vision_config=_siglip(64, 2, 4, 128, 64, 8), text_config=_qwen2(128, 2, 4, 2, 256),
                         projector_hidden_size=256, region_hidden_size=128,
                         **_FROM_SCRATCH),
            teacher=TeacherConfig(heads=ALL_HEADS),
            p4d=P4DConfig(hidden_size=256),
            tokenizer_vocab_size=1000,
        )
    if name == "small":
        return Preset(
            name,
            student=dict(vision_config=_siglip(192, 4, 6, 512, 112, 14), text_config=_qwen2(384, 4, 6, 2, 1024),
                         projector_hidden_size=768, region_hidden_size=384,
                         **_FROM_SCRATCH),
            teacher=TeacherConfig(image_size=112, patch_size=14, hidden_size=192, num_hidden_layers=6,
                                  num_attention_heads=6, intermediate_size=512, head_layers=(2, 3, 5, 6),
                                  head_features=64, heads=ALL_HEADS),
            p4d=P4DConfig(hidden_size=768),
            tokenizer_vocab_size=2000,
        )
    if name == "paper":
        return Preset(
            name,
            student=dict(vision_config=_siglip(1152, 27, 16, 4304, 448, 14),
                         text_config=dict(_qwen2(3584, 28, 28, 4, 18944, 32768), rope_theta=1000000.0),
                         projector_type="nvila", projector_hidden_size=3456, vision_select_layer=-2,
                         frame_separator="\n", region_hidden_size=3584),
            teacher=TeacherConfig(image_size=224, patch_size=14, hidden_size=1408, num_hidden_layers=40,
                                  num_attention_heads=16, intermediate_size=6144, head_layers=(14, 21, 28, 36),
                                  head_features=256, heads=ALL_HEADS),
            p4d=P4DConfig(hidden_size=2560),
            tokenizer_vocab_size=8000,
        )
    raise ValueError(f"preset must be one of {PRESETS}, got {name!r}")


def student_config(preset: str | Preset, tokenizer=None, **overrides) -> RGPT4DConfig:
    """The student's config for a preset, with the tokenizer's vocabulary and special token ids.

    A `frame_separator` text (the `paper` preset's "\n") becomes `frame_separator_id`, the one token
    the tokenizer writes it as (ignored without a tokenizer)."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    kwargs = {k: (dict(v) if isinstance(v, dict) else v) for k, v in p.student.items()}
    kwargs.update(overrides)
    separator = kwargs.pop("frame_separator", None)
    if tokenizer is not None:
        ids = special_token_ids(tokenizer, regions=kwargs.get("region_mode", "tokens") in ("tokens", "both"))
        text = dict(kwargs["text_config"])
        text.update(vocab_size=len(tokenizer), pad_token_id=ids["pad"], eos_token_id=ids["eos"],
                    bos_token_id=ids["bos"])
        kwargs["text_config"] = text
        kwargs.update(image_token_id=ids["image"], obj_token_ids=ids["obj"],
                      pad_token_id=ids["pad"], eos_token_id=ids["eos"], bos_token_id=ids["bos"])
        kwargs.setdefault("max_regions", len(ids["obj"]))
        if separator is not None:
            kwargs.setdefault("frame_separator_id", single_token_id(tokenizer, separator, "frame_separator"))
    return RGPT4DConfig(**kwargs)
