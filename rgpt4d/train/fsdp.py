"""`--strategy fsdp`: the student sharded with torch's FSDP2 (`torch.distributed.fsdp.fully_shard`).

Every vision encoder layer and every LLM decoder layer is its own FSDP unit, then the whole model is
one (the embeddings, projector, region encoder, final norm, LM head and D_4DP): each process keeps
1/N of the parameters, of the gradients and of the AdamW state, and a unit's full parameters exist
only while it runs. Frozen parameters outside those layers (the teacher's heads) are left whole on
every process (`ignored_params`): they get no gradient and are small. The frozen vision tower is
sharded by layer like the LLM (it saves parameter memory) and gets no gradient either. On GPU with
bf16 on, units compute in bf16 and reduce gradients in fp32 (MixedPrecisionPolicy); the optimizer
keeps fp32 master shards. Memory per GPU: docs/training.md.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh


def student_of(model: nn.Module) -> nn.Module:
    return model.inference_model() if hasattr(model, "inference_model") else model


def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The vision encoder's and the LLM's layer lists (each layer becomes one FSDP unit)."""
    student = student_of(model)
    if not (hasattr(student, "vision_tower") and hasattr(student, "language_model")):
        raise ValueError(f"strategy: fsdp shards a student (its vision and LLM layers), not a "
                         f"{type(student).__name__}; use strategy ddp")
    vision = student.vision_tower
    vision = getattr(vision, "vision_model", vision)  # SiglipVisionModel: .vision_model in some versions
    return [vision.encoder.layers, student.language_model.model.layers]


def shard_model(model: nn.Module, device: torch.device, world: int, bf16: bool) -> nn.Module:
    """Apply fully_shard in place (per layer, then the model) over all `world` processes; returns the model."""
    # start-up: ~1.5 s (python -X importtime -c "import torch.distributed.fsdp"), only FSDP runs need it
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
          else MixedPrecisionPolicy())
    in_blocks = set()
    for layers in block_lists(model):
        for layer in layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
            in_blocks.update(id(p) for p in layer.parameters())
    ignored = {p for p in model.parameters() if not p.requires_grad and id(p) not in in_blocks}
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=ignored or None)
    # a parameter that gets no gradient on one process (e.g. no region in its batch) still takes
    # part in the reduce-scatter (as zeros), so every process sends the same collectives
    model.set_reduce_scatter_unused_params(True)
    return model


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module):
    """Accumulate gradients locally (a micro-batch before the last of an optimizer step)."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_state_dict(model: nn.Module) -> dict:
    """The unsharded state dict on CPU, on rank 0 (other ranks get {}); every process must call it."""
    # start-up: ~2 s (python -X importtime -c "import torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def student_state_dict(model: nn.Module) -> dict:
    """full_state_dict restricted to the inference student (keys as its own state_dict's)."""
    full = full_state_dict(model)
    if student_of(model) is model:
        return full
    return {k[len("student."):]: v for k, v in full.items() if k.startswith("student.")}
