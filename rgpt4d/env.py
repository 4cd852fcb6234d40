"""`rgpt4d env` / `python -m rgpt4d.env`: versions, build flags, available backends and why others are missing."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

import torch

import rgpt4d
from rgpt4d.ops import registry


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report() -> str:

    lines = [
        f"rgpt4d        {rgpt4d.__version__}  ({os.path.dirname(rgpt4d.__file__)})",
        f"python        {sys.version.split()[0]}  ({platform.platform()})",
        f"torch         {torch.__version__}  (CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()})",
        f"triton        {_version('triton')}  (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')})",
        f"transformers  {_version('transformers')}",
        f"torchvision   {_version('torchvision')}",
        f"flash-attn    {_version('flash-attn')}",
        f"xformers      {_version('xformers')}",
        f"nvtx          {_version('nvtx')}",
        f"threads       {torch.get_num_threads()} (torch intra-op)",
    ]
    ext = registry.extension_info()
    lines.append(f"rgpt4d._C     {'loaded' if ext['loaded'] else 'NOT loaded (' + str(ext['error']) + ')'}")
    if ext["loaded"]:
        lines.append(f"  built with CUDA kernels: {ext['cuda']}")
        lines.append(f"  build: {ext['build'] or 'unknown'}")
        if torch.cuda.is_available():
            lines.append(f"  device: {torch.cuda.get_device_name()}")
    lines.append(f"backends      {', '.join(registry.available_backends())}")
    for name, why in registry.unavailable_reasons().items():
        lines.append(f"  {name:7s} unavailable: {why}")
    default = os.environ.get("RGPT4D_BACKEND") or "auto"
    lines.append(f"RGPT4D_BACKEND={default}")
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
