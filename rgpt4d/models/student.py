"""The 4D-RGPT student: an NVILA-like MLLM built from transformers parts and the project's ops.

    frames [B, T, 3, H, W], timestamps [B, T] (seconds)
      -> SigLIP vision tower (frozen)                         tokens [B, T, g*g, D]
         (its last hidden state, or hidden_states[vision_select_layer]: NVILA's -2)
      -> TPE + 3x3 window downsample + LayerNorm (one fused op: rgpt4d.ops.tpe_downsample_layernorm)
      -> Linear, GELU, Linear (the projector MLP; projector_type "nvila": NVILA's Linear, GELU,
         LayerNorm, Linear, GELU, Linear)                     visual tokens [B, T, M, D_llm]
      -> placed at the `<image>` placeholders of the prompt (NVILA's layout: each frame's M tokens
         followed by the frame separator token "\n", RGPT4DConfig.visual_token_ids)
    boxes [B, R, 4] (first frame, pixels)
      -> RegionalEncoder4D (rgpt4d.ops.region_pool on every frame's feature grid, TPE fused in,
         Linear), mean over frames, GELU, Linear to D_llm                                         region tokens [B, R, D_llm]
      -> placed at the `<obj_N>` tokens of the prompt
    -> Qwen2 causal LM -> the answer letter.

Pretrained weights: `from_parts` (Hugging Face SigLIP + Qwen2 + tokenizer) and `from_nvila` (the
NVILA layout: NVILA-Lite-8B, the released 4D-RGPT-8B); rgpt4d.models.pretrained, docs/checkpoints.md.

Regions: region tokens at `<obj_N>` (region_mode="tokens", the default) and/or the SoM image as an
extra first visual input ("som" / "both"). The default is "tokens": the `<obj_N>` embedding then *is*
the region's features, so the reference needs no reading of the drawn digits (3x5-pixel tags that a
patch-8 vision tower at 64 px barely resolves), and it costs R tokens instead of M extra visual
tokens. The SoM path is kept for the R4D-Bench protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (AutoConfig, AutoModelForImageTextToText, PreTrainedModel, Qwen2Config,
                          Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel)
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2MLP, Qwen2RMSNorm
from transformers.models.siglip import modeling_siglip
from transformers.models.siglip.modeling_siglip import SiglipAttention
from transformers.utils import ModelOutput

from rgpt4d.models.attention import attention_function, resolve_attn_implementation
from rgpt4d.models.configs import RGPT4DConfig, get_preset, student_config
from rgpt4d.models.frames import normalize_frames
from rgpt4d.models.pretrained import build_nvila, build_parts
from rgpt4d.models.regional_encoder import RegionalEncoder4D
from rgpt4d.models.tokenizer import train_tokenizer
from rgpt4d.ops import fused_linear_cross_entropy, rms_norm, rope, swiglu, tpe_downsample_layernorm
from rgpt4d.ops.lm import IGNORE_INDEX

BOX_TOLERANCE = 1e-3  # pixels


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


class Projector(nn.Module):
    """E_P with the TPE in front: fused (TPE + window downsample + LayerNorm), then Linear-GELU-Linear.

    tpe_kind "sinusoidal": the paper's encoding of each frame's time in seconds; "learned": a table with
    one row per frame index (zero-initialised), as in the released code.

    kind "nvila": NVILA's `mlp_downsample_3x3_fix` after the same prologue (its layers.0 downsample and
    layers.1 LayerNorm are the fused op): linear_1 (layers.2), GELU, norm_2 (layers.4), linear_2
    (layers.5), GELU, linear_3 (layers.7)."""

    def __init__(self, dim: int, window: int, hidden: int, out_dim: int, tpe: bool, base: float = 10000.0,
                 tpe_kind: str = "sinusoidal", max_frames: int = 16, kind: str = "mlp"):
        super().__init__()
        self.dim, self.window, self.tpe, self.base, self.tpe_kind = dim, window, tpe, base, tpe_kind
        k = window * window * dim
        self.norm_weight = nn.Parameter(torch.ones(k))
        self.norm_bias = nn.Parameter(torch.zeros(k))
        self.linear_1 = nn.Linear(k, hidden)
        self.act = nn.GELU()
        self.norm_2 = nn.LayerNorm(hidden) if kind == "nvila" else None
        self.linear_2 = nn.Linear(hidden, out_dim)
        self.linear_3 = nn.Linear(out_dim, out_dim) if kind == "nvila" else None
        self.tpe_table = nn.Parameter(torch.zeros(max_frames, dim)) if tpe and tpe_kind == "learned" else None
        # TPE off: the same fused op with an all-zero one-row table (adds nothing)
        self.register_buffer("_no_tpe_table", torch.zeros(1, dim), persistent=False)

    def prologue(self, x: Tensor, timestamps: Tensor, grid: tuple[int, int]) -> Tensor:
        if self.tpe and self.tpe_table is None:
            return tpe_downsample_layernorm(x, timestamps.to(x.dtype), None, self.norm_weight, self.norm_bias,
                                            grid=grid, window=self.window, base=self.base)
        if self.tpe:  # learned: row t of the table for frame t
            index = torch.arange(x.shape[1], device=x.device).expand(timestamps.shape)
            table = self.tpe_table.to(x.dtype)
        else:
            index = torch.zeros(timestamps.shape, dtype=torch.long, device=x.device)
            table = self._no_tpe_table.to(x.dtype)
        return tpe_downsample_layernorm(x, index, table, self.norm_weight, self.norm_bias, grid=grid,
                                        window=self.window)

    def forward(self, x: Tensor, timestamps: Tensor, grid: tuple[int, int]) -> Tensor:
        """x [B, T, h*w, D], timestamps [B, T] seconds -> [B, T, M, out_dim]."""
        h = self.act(self.linear_1(self.prologue(x, timestamps, grid)))
        if self.norm_2 is None:
            return self.linear_2(h)
        return self.linear_3(self.act(self.linear_2(self.norm_2(h))))


class RegionTokenEncoder(nn.Module):
    """Region tokens from first-frame boxes: RegionalEncoder4D (RoIAlign 1x1 of every frame's
    feature grid with the TPE fused in, rgpt4d.ops.region_pool, then a Linear), averaged over the
    frames, GELU, Linear to the LLM width: one token per region for its `<obj_N>`.

    Three optional additions, for students that must learn from scratch: `relative` pools the
    features relative to each frame's mean and LayerNorms the result (a frozen, randomly initialised
    vision tower gives every region nearly the same pooled vector: the part all regions share
    swamps what tells them apart); `geometry` adds an embedding of the box's normalised corners and
    size (pooling to 1x1 forgets where the box is and how big it is); `motion` adds a Linear of the
    change of the pooled feature between the first and the second half of the frames (the time
    average forgets it)."""

    def __init__(self, dim: int, hidden: int, out_dim: int, tpe: bool, base: float = 10000.0,
                 spatial_scale: float = 1.0, tpe_kind: str = "sinusoidal", max_frames: int = 16,
                 geometry: bool = False, motion: bool = False, image_size: Optional[int] = None,
                 relative: bool = False):
        super().__init__()
        self.tpe, self.tpe_kind = tpe, tpe_kind
        self.encoder = RegionalEncoder4D(dim, hidden, mode="box", tpe=tpe_kind if tpe else "none", tpe_base=base,
                                         max_frames=max_frames, spatial_scale=spatial_scale, channels_last=True,
                                         aligned=True)
        if geometry and not image_size:
            raise ValueError("RegionTokenEncoder: geometry=True needs image_size (the pixels the boxes are in)")
        self.image_size = image_size
        self.relative = relative
        self.norm = nn.LayerNorm(hidden) if relative else None
        self.box_embed = nn.Linear(6, hidden) if geometry else None
        self.box_norm = nn.LayerNorm(hidden) if geometry and relative else None
        self.motion_proj = nn.Linear(hidden, hidden) if motion else None
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden, out_dim)

    def forward(self, features: Tensor, boxes: Tensor, valid: Tensor, timestamps: Tensor) -> Tensor:
        """features [B, T, h, w, D] (channels-last grid), boxes [B, R, 4] in the pixels of the image the
        grid was computed from (spatial_scale = grid / pixels), valid [B, R], timestamps [B, T]
        seconds -> [B, R, out_dim]."""
        ts = timestamps.to(features.dtype) if self.tpe and self.tpe_kind == "sinusoidal" else None
        tokens = self.encoder(features, boxes.to(features.dtype).contiguous(), ts, valid.contiguous())
        if self.relative:  # proj(pooled - frame mean): the projection is linear, so subtract W @ mean
            frame_mean = F.linear(features.mean((2, 3)), self.encoder.proj.weight)  # [B, T, hidden]
            tokens = tokens - frame_mean[:, :, None] * valid[:, None, :, None].to(tokens.dtype)
        h = tokens.mean(1)
        if self.motion_proj is not None:
            half = tokens.shape[1] // 2
            late = tokens[:, half:].mean(1)
            h = h + self.motion_proj(late - tokens[:, :half].mean(1) if half else late - late)
        if self.norm is not None:
            h = self.norm(h)
        if self.box_embed is not None:
            b = boxes.to(h.dtype) / self.image_size
            geo = torch.cat([b, b[..., 2:] - b[..., :2]], -1) * 2 - 1  # x0, y0, x1, y1, width, height in [-1, 1]
            g = self.box_embed(geo)
            h = h + (self.box_norm(g) if self.box_norm is not None else g) * valid[..., None].to(h.dtype)
        return self.linear_2(self.act(h))


class _Qwen2RMSNorm(Qwen2RMSNorm):
    """Qwen2RMSNorm through rgpt4d.ops.rms_norm: backend eager is the module's own code."""

    def forward(self, hidden_states: Tensor) -> Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)


class _Qwen2MLP(Qwen2MLP):
    """Qwen2MLP (silu) with its activation through rgpt4d.ops.swiglu: backend eager is silu(gate) * up."""

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class _SiglipAttention(SiglipAttention):
    """SiglipAttention whose "sdpa" attention goes through rgpt4d.ops.attention (sdpa_attention): the
    projections are the module's own; backend eager is transformers' sdpa path."""

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, **kwargs):
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        fn = attention_function(self, modeling_siglip.eager_attention_forward)
        out, weights = fn(self, q, k, v, attention_mask, is_causal=self.is_causal, scaling=self.scale,
                          dropout=0.0 if not self.training else self.dropout)
        return self.out_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


def use_rgpt4d_vision_ops(vision_tower: nn.Module) -> nn.Module:
    """Route the SigLIP tower's attention through rgpt4d.ops.attention (see sdpa_attention), in place;
    parameters and state dicts unchanged."""
    for module in vision_tower.modules():
        if type(module) is SiglipAttention:
            module.__class__ = _SiglipAttention
    return vision_tower


class _Qwen2Attention(Qwen2Attention):
    """Qwen2Attention with the rotary embedding through rgpt4d.ops.rope (q and k in one op; backend eager
    is transformers' apply_rotary_pos_emb) and, under attn_implementation "sdpa", the attention through
    rgpt4d.ops.attention (sdpa_attention). The rest is transformers' Qwen2Attention.forward, as is."""

    def forward(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor],
                attention_mask: Optional[Tensor], cache=None, **kwargs):
        if cache is None and "past_key_values" in kwargs:  # transformers' deprecated name
            cache = kwargs.pop("past_key_values")
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query_states, key_states = rope(query_states, key_states, cos, sin)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
        attention_interface = attention_function(self, modeling_qwen2.eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self, query_states, key_states, value_states, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
            sliding_window=self.sliding_window, **kwargs)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


def use_rgpt4d_llm_ops(language_model: nn.Module) -> nn.Module:
    """Route the Qwen2 LLM's RMSNorms, SwiGLU MLPs, rotary embeddings and attention through rgpt4d.ops
    (rms_norm, swiglu, rope, attention), in place.

    The modules keep their parameters and names (state dicts are unchanged); only their forward changes
    to call the op, so the process-wide backend (`--ops fused|eager`, rgpt4d.ops.set_backend) picks the
    fused kernels or the plain-PyTorch references, which are transformers' own code."""
    for module in language_model.modules():
        if type(module) is Qwen2RMSNorm:
            module.__class__ = _Qwen2RMSNorm
        elif type(module) is Qwen2MLP and getattr(module.config, "hidden_act", None) == "silu":
            module.__class__ = _Qwen2MLP
        elif type(module) is Qwen2Attention:
            module.__class__ = _Qwen2Attention
    return language_model


@dataclass
class RGPT4DOutput(ModelOutput):
    loss: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    visual_hidden: Optional[Tensor] = None  # [B, T, Ho, Wo, D_llm]: last-layer states at the video tokens


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class RGPT4DPreTrainedModel(PreTrainedModel):
    config_class = RGPT4DConfig
    base_model_prefix = "rgpt4d"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["Qwen2DecoderLayer", "SiglipEncoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Linear layers (ours and the towers') as Qwen2/SigLIP-style N(0, 0.02) with zero bias; norms and
        # embeddings keep the initialisation their own modules gave them.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class RGPT4DForConditionalGeneration(RGPT4DPreTrainedModel):
    """The student (and the deployed inference model: it holds no teacher and no D_4DP).

    `vision_tower` / `language_model`: already-built towers to use instead of fresh ones (the
    loaders pass pretrained ones; their weights are left as they are, only the projector and the
    region encoder are initialised)."""

    def __init__(self, config: RGPT4DConfig, vision_tower: Optional[SiglipVisionModel] = None,
                 language_model: Optional[Qwen2ForCausalLM] = None):
        super().__init__(config)
        attn = resolve_attn_implementation(config.attn_implementation_name)
        vcfg = SiglipVisionConfig(**config.vision_config)
        tcfg = Qwen2Config(**config.text_config)
        for given in (vision_tower, language_model):
            for module in given.modules() if given is not None else ():
                module._is_hf_initialized = True  # post_init's weight initialisation skips them
        if vision_tower is None:
            vision_tower = SiglipVisionModel._from_config(vcfg, attn_implementation=attn)
        self.vision_tower = use_rgpt4d_vision_ops(vision_tower)
        D, D_llm = vcfg.hidden_size, tcfg.hidden_size
        self.projector = Projector(D, config.downsample_window, config.projector_hidden_size, D_llm, config.tpe,
                                   config.tpe_base, config.tpe_kind, config.num_frames, config.projector_type)
        self.region_encoder = (RegionTokenEncoder(D, config.region_hidden_size, D_llm, config.tpe, config.tpe_base,
                                                  spatial_scale=config.patch_grid / config.image_size,
                                                  tpe_kind=config.tpe_kind, max_frames=config.num_frames,
                                                  geometry=config.region_geometry, motion=config.region_motion,
                                                  image_size=config.image_size, relative=config.region_relative)
                               if config.region_mode in ("tokens", "both") else None)
        if language_model is None:
            language_model = Qwen2ForCausalLM._from_config(tcfg, attn_implementation=attn)
        self.language_model = use_rgpt4d_llm_ops(language_model)
        self.post_init()
        self.apply_freezing()

    def apply_freezing(self) -> None:
        """The paper trains projector + LLM; the vision encoder stays frozen (config.freeze_vision)."""
        if self.config.freeze_vision:
            self.vision_tower.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        model.apply_freezing()  # loading replaces the parameters, and with them requires_grad
        return model

    @classmethod
    def from_parts(cls, vision_model, language_model, tokenizer, *, dtype: torch.dtype = torch.float32,
                   **config_overrides) -> "RGPT4DForConditionalGeneration":
        """A student from pretrained parts: a SiglipVisionModel, a Qwen2ForCausalLM and a fast
        tokenizer, each a local Hugging Face folder or an already-built object. The towers keep their
        weights; `<image>` and `<obj_N>` are added to the tokenizer and the embeddings grown to fit
        (existing rows kept); the projector (and region encoder) are new. `config_overrides`: any
        RGPT4DConfig field. The prepared tokenizer is `model.tokenizer` (rgpt4d.models.pretrained)."""
        model, tok = build_parts(cls, vision_model, language_model, tokenizer, dtype=dtype, **config_overrides)
        model.tokenizer = tok
        return model

    @classmethod
    def from_nvila(cls, path, *, dtype: torch.dtype = torch.float32,
                   **config_overrides) -> "RGPT4DForConditionalGeneration":
        """The student from an NVILA folder (config.json, llm/, vision_tower/, mm_projector/ with
        projector mlp_downsample_3x3_fix): NVILA-Lite-8B or the released 4D-RGPT-8B, every weight
        loaded, TPE on (rgpt4d.models.pretrained.build_nvila, docs/checkpoints.md). The prepared
        tokenizer is `model.tokenizer`."""
        model, tok = build_nvila(cls, path, dtype=dtype, **config_overrides)
        model.tokenizer = tok
        return model

    # -- helpers -------------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    @property
    def grid(self) -> tuple[int, int]:
        g = self.config.patch_grid
        return (g, g)

    @property
    def downsampled_grid(self) -> tuple[int, int]:
        g = -(-self.config.patch_grid // self.config.downsample_window)
        return (g, g)

    def vision_features(self, images: Tensor) -> Tensor:
        """images [N, 3, S, S] normalised -> [N, g*g, D]: the tower's last hidden state, or
        hidden_states[config.vision_select_layer] (no final LayerNorm; NVILA's -2)."""
        dtype = self.vision_tower.get_input_embeddings().weight.dtype
        k = self.config.vision_select_layer
        if k is None:
            return self.vision_tower(pixel_values=images.to(dtype)).last_hidden_state
        return self.vision_tower(pixel_values=images.to(dtype), output_hidden_states=True).hidden_states[k]

    # -- validation ----------------------------------------------------------------------------
    def _validate(self, input_ids, frames, timestamps, boxes, region_mask, region_ids, som_image):
        cfg = self.config
        if frames.dim() != 5 or frames.shape[2] != 3:
            raise ValueError(f"frames: expected [B, T, 3, H, W], got {tuple(frames.shape)}")
        B, T = frames.shape[:2]
        if T != cfg.num_frames:
            raise ValueError(f"frames: the model takes {cfg.num_frames} frames per video, got {T}")
        if tuple(timestamps.shape) != (B, T):
            raise ValueError(f"timestamps: expected [B, T] = [{B}, {T}] (one time in seconds per frame), "
                             f"got {tuple(timestamps.shape)}")
        if not torch.isfinite(timestamps).all():
            raise ValueError("timestamps: must be finite seconds")
        if T > 1 and not (timestamps[:, 1:] > timestamps[:, :-1]).all():
            b = int((timestamps[:, 1:] <= timestamps[:, :-1]).any(1).nonzero()[0])
            raise ValueError(f"timestamps: must be strictly increasing (seconds of each frame); sample {b} has "
                             f"{[round(float(t), 4) for t in timestamps[b]]}")
        if input_ids.shape[0] != B:
            raise ValueError(f"input_ids: batch {input_ids.shape[0]} but frames has batch {B}")
        n_img = (input_ids == cfg.image_token_id).sum(1)
        if (n_img != cfg.num_visual_tokens).any():
            raise ValueError(f"input_ids: each prompt needs {cfg.num_visual_tokens} <image> tokens "
                             f"(rgpt4d.models.encode_batch writes them), got {n_img.tolist()}")
        if cfg.region_mode in ("som", "both") and som_image is None:
            raise ValueError(f"som_image: region_mode={cfg.region_mode!r} needs the SoM image [B, 3, H, W]")
        obj_ids = torch.tensor(cfg.obj_token_ids or [], dtype=input_ids.dtype, device=input_ids.device)
        uses_obj = torch.isin(input_ids, obj_ids) if obj_ids.numel() else torch.zeros_like(input_ids, dtype=torch.bool)
        if self.region_encoder is None or not uses_obj.any():
            return
        if boxes is None:
            raise ValueError("boxes: the prompt refers to <obj_N> regions but no boxes were given")
        if boxes.dim() != 3 or boxes.shape[0] != B or boxes.shape[2] != 4:
            raise ValueError(f"boxes: expected [B, R, 4] first-frame boxes (x0, y0, x1, y1 pixels), got "
                             f"{tuple(boxes.shape)}")
        R = boxes.shape[1]
        valid = torch.ones(B, R, dtype=torch.bool, device=boxes.device) if region_mask is None else region_mask.bool()
        H, W = frames.shape[-2:]
        bad = valid & ~(torch.isfinite(boxes).all(-1)
                        & (boxes[..., 0] >= -BOX_TOLERANCE) & (boxes[..., 1] >= -BOX_TOLERANCE)
                        & (boxes[..., 2] <= W + BOX_TOLERANCE) & (boxes[..., 3] <= H + BOX_TOLERANCE)
                        & (boxes[..., 2] >= boxes[..., 0]) & (boxes[..., 3] >= boxes[..., 1]))
        if bad.any():
            b, r = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"boxes: region {r + 1} of sample {b} is {[round(float(v), 3) for v in boxes[b, r]]}, "
                             f"not inside the {W}x{H} frame (x0 <= x1, y0 <= y1, pixels)")
        for b in range(B):
            refs = self._obj_numbers(input_ids[b])
            for n in refs.tolist():
                idx = self._region_index(n, b, region_ids, R)
                if idx is None or not bool(valid[b, idx]):
                    raise ValueError(f"input_ids: sample {b} refers to <obj_{n}> but only {int(valid[b].sum())} "
                                     f"region(s) were given in boxes")

    def _obj_numbers(self, ids: Tensor) -> Tensor:
        obj_ids = torch.tensor(self.config.obj_token_ids, device=ids.device)
        hit = ids[:, None] == obj_ids[None]
        return hit.float().argmax(1)[hit.any(1)] + 1  # N of each <obj_N> in order

    @staticmethod
    def _region_index(n: int, b: int, region_ids: Optional[Tensor], R: int) -> Optional[int]:
        if region_ids is None:
            return n - 1 if n - 1 < R else None
        hits = (region_ids[b] == n).nonzero()
        return int(hits[0]) if len(hits) else None

    # -- embedding the multimodal prompt -------------------------------------------------------
    def build_inputs_embeds(self, input_ids: Tensor, frames: Tensor, timestamps: Tensor,
                            boxes: Optional[Tensor] = None, region_mask: Optional[Tensor] = None,
                            region_ids: Optional[Tensor] = None, som_image: Optional[Tensor] = None,
                            validate: bool = True) -> Tensor:
        """Text embeddings with the visual tokens at `<image>` and the region tokens at `<obj_N>`."""
        cfg = self.config
        if validate:
            self._validate(input_ids, frames, timestamps, boxes, region_mask, region_ids, som_image)
        B, T = frames.shape[:2]
        S = cfg.image_size
        timestamps = timestamps.float()
        feats = self.vision_features(normalize_frames(frames, S).flatten(0, 1)).unflatten(0, (B, T))  # [B,T,P,D]
        visual = self.projector(feats, timestamps, self.grid)  # [B, T, M, D_llm]
        chunks = []
        if cfg.region_mode in ("som", "both"):
            som = normalize_frames(som_image[:, None], S)[:, 0]
            som_feats = self.vision_features(som)[:, None]
            chunks.append(self.projector(som_feats, timestamps[:, :1], self.grid).flatten(1, 2))
        chunks.append(visual.flatten(1, 2))
        visual_seq = torch.cat(chunks, 1)
        embeds = self.get_input_embeddings()(input_ids)
        img_mask = input_ids == cfg.image_token_id
        embeds = embeds.masked_scatter(img_mask[..., None], visual_seq.to(embeds.dtype))
        if self.region_encoder is not None and boxes is not None and boxes.shape[1] > 0:
            H, W = frames.shape[-2:]
            scale = torch.tensor([S / W, S / H, S / W, S / H], dtype=boxes.dtype, device=boxes.device)
            valid = (torch.ones(boxes.shape[:2], dtype=torch.bool, device=boxes.device) if region_mask is None
                     else region_mask.bool())
            region_tokens = self.region_encoder(feats.unflatten(2, self.grid), boxes * scale, valid,
                                                timestamps)  # [B, R, D_llm]
            embeds = embeds.clone()
            for b in range(B):
                obj_ids = torch.tensor(cfg.obj_token_ids, device=input_ids.device)
                pos = torch.isin(input_ids[b], obj_ids).nonzero()[:, 0]
                for p, n in zip(pos.tolist(), self._obj_numbers(input_ids[b]).tolist()):
                    idx = self._region_index(n, b, region_ids, boxes.shape[1])
                    if idx is not None:
                        embeds[b, p] = region_tokens[b, idx].to(embeds.dtype)
        return embeds

    @staticmethod
    def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
        return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)

    # -- forward / generate --------------------------------------------------------------------
    def forward(self, input_ids: Tensor, frames: Tensor, timestamps: Tensor, attention_mask: Optional[Tensor] = None,
                boxes: Optional[Tensor] = None, region_mask: Optional[Tensor] = None,
                region_ids: Optional[Tensor] = None, som_image: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, output_visual_hidden: bool = False, return_logits: bool = True,
                **kwargs) -> RGPT4DOutput:
        """input_ids/attention_mask/labels [B, L] (rgpt4d.models.encode_batch), frames [B, T, 3, H, W]
        (uint8 or float in [0, 1]), timestamps [B, T] seconds, boxes [B, R, 4] first-frame pixels with
        region_mask [B, R] (and optionally region_ids [B, R]: the N of each box's <obj_N>).

        return_logits=False with labels (training): the loss comes from rgpt4d.ops.fused_linear_cross_entropy
        (the LM head fused with the SFT loss: the same loss as transformers' causal-LM loss, the [B, L, V]
        logits are not materialised) and the output's logits are None."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.build_inputs_embeds(input_ids, frames, timestamps, boxes, region_mask, region_ids, som_image)
        position_ids = self.position_ids_from_mask(attention_mask)
        if labels is not None and not return_logits:
            lm = self.language_model
            base = lm.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                            output_hidden_states=output_visual_hidden, use_cache=False)
            # transformers' ForCausalLMLoss: position t predicts labels[t + 1]; the mean over labelled tokens
            shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
            loss = fused_linear_cross_entropy(base.last_hidden_state, lm.lm_head.weight, shifted, lm.lm_head.bias,
                                              ignore_index=IGNORE_INDEX)
            logits, hidden_states = None, base.hidden_states
        else:
            out = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                      labels=labels, output_hidden_states=output_visual_hidden, use_cache=False)
            loss, logits, hidden_states = out.loss, out.logits, out.hidden_states
        visual_hidden = None
        if output_visual_hidden:
            h = hidden_states[-1]
            B, T = frames.shape[:2]
            M = self.config.tokens_per_image
            sel = h[input_ids == self.config.image_token_id].view(B, -1, h.shape[-1])[:, -T * M:]
            visual_hidden = sel.view(B, T, *self.downsampled_grid, h.shape[-1])
        return RGPT4DOutput(loss=loss, logits=logits, visual_hidden=visual_hidden)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, frames: Tensor, timestamps: Tensor, attention_mask: Optional[Tensor] = None,
                 boxes: Optional[Tensor] = None, region_mask: Optional[Tensor] = None,
                 region_ids: Optional[Tensor] = None, som_image: Optional[Tensor] = None,
                 max_new_tokens: int = 1, **generate_kwargs) -> Tensor:
        """Greedy (by default) generation with the language model's KV cache. Returns [B, new] ids."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.build_inputs_embeds(input_ids, frames, timestamps, boxes, region_mask, region_ids, som_image)
        generate_kwargs.setdefault("do_sample", False)
        generate_kwargs.setdefault("pad_token_id", self.config.pad_token_id)
        generate_kwargs.setdefault("eos_token_id", self.config.eos_token_id)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask,
                                            max_new_tokens=max_new_tokens, use_cache=True, **generate_kwargs)

    @torch.no_grad()
    def option_log_likelihoods(self, input_ids: Tensor, frames: Tensor, timestamps: Tensor,
                               options: list[list[list[int]]], attention_mask: Optional[Tensor] = None,
                               boxes: Optional[Tensor] = None, region_mask: Optional[Tensor] = None,
                               region_ids: Optional[Tensor] = None, som_image: Optional[Tensor] = None) -> Tensor:
        """log p(option's tokens | prompt), summed over the option's tokens, for every option of every
        prompt: `options[b][k]` is the token ids of prompt b's option k. The prompt (vision, regions,
        LLM) runs once; its KV cache is repeated for the options. Returns [B, K] float32, -inf where a
        prompt has fewer than K options."""
        B = input_ids.shape[0]
        if len(options) != B:
            raise ValueError(f"options: {len(options)} option lists for a batch of {B} prompts")
        for b, opts in enumerate(options):
            if not opts or any(len(o) == 0 for o in opts):
                raise ValueError(f"options: prompt {b} needs at least one option, each with at least one token")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        K = max(len(o) for o in options)
        Lc = max(len(c) for o in options for c in o)
        dev = input_ids.device
        cont = torch.full((B * K, Lc), self.config.pad_token_id, dtype=torch.long)
        valid = torch.zeros(B * K, Lc, dtype=torch.bool)
        for b, opts in enumerate(options):
            for k, ids in enumerate(opts):
                cont[b * K + k, : len(ids)] = torch.tensor(ids)
                valid[b * K + k, : len(ids)] = True
        cont, valid = cont.to(dev), valid.to(dev)
        embeds = self.build_inputs_embeds(input_ids, frames, timestamps, boxes, region_mask, region_ids, som_image)
        pos = self.position_ids_from_mask(attention_mask)
        out = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=pos,
                                  use_cache=True, logits_to_keep=1)
        first = out.logits[:, -1].float().log_softmax(-1).repeat_interleave(K, 0)  # [B*K, V]
        cache = out.cache
        cache.batch_repeat_interleave(K)
        # the options continue each prompt: right-padded, so padding never precedes a real token
        mask = torch.cat([attention_mask.repeat_interleave(K, 0), torch.ones_like(cont)], 1)
        cpos = pos[:, -1:].repeat_interleave(K, 0) + 1 + torch.arange(Lc, device=dev)
        logp = self.language_model(input_ids=cont, attention_mask=mask, position_ids=cpos, cache=cache,
                                   use_cache=True).logits.float().log_softmax(-1)  # [B*K, Lc, V]
        tok = torch.cat([first.gather(1, cont[:, :1]), logp[:, :-1].gather(2, cont[:, 1:, None])[..., 0]], 1)
        score = tok.masked_fill(~valid, 0.0).sum(1).view(B, K)
        present = torch.tensor([[k < len(o) for k in range(K)] for o in options], device=dev)
        return score.masked_fill(~present, float("-inf"))


def build_student(preset: str = "tiny", tokenizer=None, **overrides):
    """A freshly initialised student for a preset (and its tokenizer, trained offline if not given)."""
    if tokenizer is None:
        p = get_preset(preset)
        tokenizer = train_tokenizer(vocab_size=p.tokenizer_vocab_size)
    return RGPT4DForConditionalGeneration(student_config(preset, tokenizer, **overrides)), tokenizer


def _register_auto_classes() -> None:
    """So that AutoConfig / AutoModelForImageTextToText.from_pretrained(path) find the student."""
    AutoConfig.register(RGPT4DConfig.model_type, RGPT4DConfig, exist_ok=True)
    AutoModelForImageTextToText.register(RGPT4DConfig, RGPT4DForConditionalGeneration, exist_ok=True)


_register_auto_classes()
