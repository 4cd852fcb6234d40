"""rgpt4d ops: one public function per op, four backends behind it (eager, cpu, triton, cuda).

See rgpt4d/ops/_backend.py for how a backend is chosen, and `available_backends()` for what
this install can run.
"""

from rgpt4d.ops._backend import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    cpu_cache_stats,
    empty_cpu_cache,
    set_backend,
    unavailable_reasons,
)
from rgpt4d.ops.lm import (
    FusedLinearCrossEntropyLoss,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_eager,
)
from rgpt4d.ops.p4d import (
    PRESETS as P4D_PRESETS,
    FusedLinearLatentLoss,
    P4DLoss,
    P4DLossOutput,
    P4DPreset,
    fused_linear_latent_loss,
    fused_linear_latent_loss_eager,
    p4d_loss,
    p4d_term_eager,
)
from rgpt4d.ops.regional import (
    MaskPool,
    RegionPool,
    RoIAlign,
    boxes_to_rois,
    mask_pool,
    mask_pool_eager,
    region_pool,
    region_pool_eager,
    roi_align,
    roi_align_eager,
)
from rgpt4d.ops.tpe import (
    TimestampPositionalEncoding,
    TPEDownsampleLayerNorm,
    tpe_add,
    tpe_add_,
    tpe_add_eager,
    tpe_downsample_layernorm,
    tpe_downsample_layernorm_eager,
    tpe_sinusoid,
)

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "cpu_cache_stats",
    "empty_cpu_cache",
    "set_backend",
    "unavailable_reasons",
    "FusedLinearCrossEntropyLoss",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_eager",
    "P4D_PRESETS",
    "FusedLinearLatentLoss",
    "P4DLoss",
    "P4DLossOutput",
    "P4DPreset",
    "fused_linear_latent_loss",
    "fused_linear_latent_loss_eager",
    "p4d_loss",
    "p4d_term_eager",
    "TimestampPositionalEncoding",
    "TPEDownsampleLayerNorm",
    "tpe_add",
    "tpe_add_",
    "tpe_add_eager",
    "tpe_downsample_layernorm",
    "tpe_downsample_layernorm_eager",
    "tpe_sinusoid",
    "MaskPool",
    "RegionPool",
    "RoIAlign",
    "boxes_to_rois",
    "mask_pool",
    "mask_pool_eager",
    "region_pool",
    "region_pool_eager",
    "roi_align",
    "roi_align_eager",
]
