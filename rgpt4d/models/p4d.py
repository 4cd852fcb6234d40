"""Perceptual 4D Distillation (training only): the decoder D_4DP and the student+P4D training model.

    LLM last-layer hidden states at the video tokens [B, T, Ho, Wo, D_llm]
      -> resample to the teacher grid: frames with stride `tubelet` (one per tubelet), each frame's
         Ho x Wo grid resized bilinearly to h x w                       [B, T', h, w, D_llm]
      -> D_4DP: "mlp" (the paper: Linear-GELU-Linear-GELU-Linear, hidden 2560, Xavier, zero bias)
                -> F^_4D [B, T', h, w, C_t];
                "linear" (the released code: one Linear per teacher head layer, std 0.1, zero bias)
                -> four grids, the last being F^_4D
      -> L_LD against the teacher latent; the grids through the teacher's *frozen* heads give the
         explicit predictions (depth, flow, motion, camray: those the loss preset weighs) for L_ED.
         The frozen heads run horizontally fused (rgpt4d.models.teacher.dpt_heads_fused: one grouped pass for all heads) unless
         rgpt4d's ops are on their eager references.
Losses: rgpt4d.ops.P4DLoss (latent + explicit in one multi-tensor op) when explicit terms are on;
latent only: rgpt4d.ops.fused_linear_latent_loss fuses D_4DP's last Linear with the loss, so the
projected [N, C_t] activation never exists whole.

`RGPT4DForP4DTraining.inference_model()` is the bare student: saving it keeps no teacher and no D_4DP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rgpt4d.models.configs import P4DConfig
from rgpt4d.models.student import RGPT4DForConditionalGeneration
from rgpt4d.models.teacher import Teacher4D, dpt_heads_fused, same_structure
from rgpt4d.ops import P4D_PRESETS, P4DLoss, fused_linear_latent_loss, get_backend


def resample_to_teacher_grid(visual: Tensor, grid: tuple[int, int, int], tubelet: int) -> Tensor:
    """[B, T, Ho, Wo, D] -> [B, T', h, w, D]: frame stride `tubelet`, bilinear spatial resize."""
    Tp, h, w = grid
    x = visual[:, ::tubelet][:, :Tp]
    if x.shape[1] != Tp:
        raise ValueError(f"P4D: {visual.shape[1]} student frames with stride {tubelet} give {x.shape[1]} "
                         f"frames, the teacher grid has {Tp}")
    B, T2, Ho, Wo, D = x.shape
    if (Ho, Wo) != (h, w):
        y = x.permute(0, 1, 4, 2, 3).flatten(0, 1)
        y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
        x = y.unflatten(0, (B, T2)).permute(0, 1, 3, 4, 2)
    return x


class P4DDecoder(nn.Module):
    """D_4DP: LLM width -> teacher width (see the module docstring for the two kinds)."""

    def __init__(self, in_dim: int, out_dim: int, config: P4DConfig, num_layers: int = 4):
        super().__init__()
        self.kind = config.decoder
        if self.kind == "mlp":
            self.fc1 = nn.Linear(in_dim, config.hidden_size)
            self.fc2 = nn.Linear(config.hidden_size, config.hidden_size)
            self.fc3 = nn.Linear(config.hidden_size, out_dim)
            for lin in (self.fc1, self.fc2, self.fc3):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)
        else:
            self.layers = nn.ModuleList(nn.Linear(in_dim, out_dim) for _ in range(num_layers))
            for lin in self.layers:
                nn.init.normal_(lin.weight, std=config.linear_init_std)
                nn.init.zeros_(lin.bias)

    def hidden(self, x: Tensor) -> Tensor:
        """The mlp's input to its last Linear (for the fused linear + loss)."""
        return F.gelu(self.fc2(F.gelu(self.fc1(x))))

    def forward(self, x: Tensor) -> list[Tensor]:
        """Grids for the four head layers (mlp: the one latent, used for all four)."""
        if self.kind == "mlp":
            return [self.fc3(self.hidden(x))] * 4
        return [lin(x) for lin in self.layers]


@dataclass
class P4DOutput:
    loss: Tensor  # total: L_SFT + P4D terms (weights from the preset)
    sft_loss: Tensor
    p4d_loss: Optional[Tensor] = None
    terms: dict = field(default_factory=dict)  # unweighted terms, for logging
    logits: Optional[Tensor] = None


class RGPT4DForP4DTraining(nn.Module):
    """Student + D_4DP + the teacher's frozen heads. Teacher targets come from the cache
    (rgpt4d.train.load_cached), so the teacher encoder is not needed to train."""

    def __init__(self, student: RGPT4DForConditionalGeneration, teacher: Teacher4D, config: P4DConfig):
        super().__init__()
        self.student = student
        self.p4d_config = config
        tcfg = teacher.config
        self.teacher_grid = tcfg.grid
        self.tubelet = tcfg.tubelet_size
        self.teacher_heads = teacher.heads  # frozen; only used to turn predicted grids into explicit maps
        self.teacher_heads.requires_grad_(False).eval()
        # the explicit terms: the teacher's heads that the loss preset weighs (the released code's
        # "code" preset has no camray term)
        self.explicit_heads = [n for n in self.teacher_heads if n in P4D_PRESETS[config.loss_preset].head_weights]
        self.fuse_heads: Optional[bool] = None  # see _fused_heads
        self._packed_heads: dict = {}  # the frozen heads' concatenated weights (dpt_heads_fused's cache)
        self.decoder = P4DDecoder(student.config.text_config["hidden_size"], tcfg.hidden_size, config)
        self.loss_fn = P4DLoss(config.loss_preset)
        self.p4d_enabled = config.latent or config.explicit

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher_heads.eval()  # frozen heads stay in eval mode
        return self

    def inference_model(self) -> RGPT4DForConditionalGeneration:
        """The deployed model: the bare student (no teacher, no D_4DP)."""
        return self.student

    def _heads(self, grids: list[Tensor]) -> dict[str, Tensor]:
        names = self.explicit_heads
        heads = [self.teacher_heads[n] for n in names]
        if self._fused_heads() and same_structure(heads):
            outs = dpt_heads_fused(heads, grids, cache=self._packed_heads)
        else:  # the reference: one head after the other
            outs = [head(grids) for head in heads]
        return {n: o.squeeze(2) if n in ("depth", "motion") else o for n, o in zip(names, outs)}

    def _fused_heads(self) -> bool:
        """fuse_heads None (default): the heads run horizontally fused (one grouped pass,
        rgpt4d.models.teacher.dpt_heads_fused) unless rgpt4d's ops are set to their eager references
        (`--ops eager`, set_backend("eager"), RGPT4D_BACKEND=eager); True / False force it. Heads
        of different structure always run one after the other."""
        if len(self.explicit_heads) < 2:
            return False
        if self.fuse_heads is not None:
            return bool(self.fuse_heads)
        return get_backend() != "eager"

    def forward(self, *, teacher_targets: Optional[dict] = None, p4d: Optional[bool] = None,
                return_logits: bool = False, **student_inputs) -> P4DOutput:
        """student_inputs: RGPT4DForConditionalGeneration.forward's (with labels); teacher_targets:
        {"latent" [B,T',h,w,C], "layers" [B,4,T',h,w,C], "depth", "flow", "motion" (logits), "camray"}.
        L_SFT comes from the fused LM head + cross-entropy (rgpt4d.ops.fused_linear_cross_entropy), so the
        output's logits are None unless return_logits=True (then transformers' LM head and loss run)."""
        use_p4d = self.p4d_enabled if p4d is None else p4d
        out = self.student(**student_inputs, output_visual_hidden=use_p4d, return_logits=return_logits)
        if out.loss is None:
            raise ValueError("labels: P4D training needs labels (the answer tokens) for L_SFT")
        if not use_p4d:
            return P4DOutput(loss=out.loss, sft_loss=out.loss, logits=out.logits)
        if teacher_targets is None:
            raise ValueError("teacher_targets: P4D is on but no cached teacher targets were given")
        cfg = self.p4d_config
        x = resample_to_teacher_grid(out.visual_hidden, self.teacher_grid, self.tubelet)
        preset = P4D_PRESETS[cfg.loss_preset]
        target_latent = teacher_targets["latent"].to(x.dtype)
        if not cfg.explicit:
            # latent only: D_4DP's last Linear fused with the loss
            kind = preset.kind
            if self.decoder.kind == "mlp":
                ld = fused_linear_latent_loss(self.decoder.hidden(x), self.decoder.fc3.weight, self.decoder.fc3.bias,
                                              target_latent, kind=kind)
            else:
                layers = teacher_targets["layers"].to(x.dtype)
                ld = sum(fused_linear_latent_loss(x, lin.weight, lin.bias, layers[:, i], kind=kind)
                         for i, lin in enumerate(self.decoder.layers)) / len(self.decoder.layers)
            p4d_total = preset.latent_weight * ld
            terms = {"latent": ld.detach()}
        else:
            grids = self.decoder(x)
            preds = self._heads(grids)
            preds["motion"] = torch.sigmoid(preds["motion"])
            tgts = {k: teacher_targets[k].to(x.dtype) for k in preds}
            tgts["motion"] = torch.sigmoid(tgts["motion"])
            if self.decoder.kind == "mlp":
                lat_pred, lat_tgt = grids[-1], target_latent
            else:
                lat_pred = torch.stack(grids, 1)
                lat_tgt = teacher_targets["layers"].to(x.dtype)
            res = self.loss_fn(lat_pred if cfg.latent else None, lat_tgt if cfg.latent else None, preds, tgts)
            p4d_total = res.total
            terms = {k: v.detach() for k, v in res.terms.items()}
        return P4DOutput(loss=out.loss + p4d_total, sft_loss=out.loss, p4d_loss=p4d_total, terms=terms,
                         logits=out.logits)
