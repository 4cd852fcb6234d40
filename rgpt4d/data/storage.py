"""Sharded storage of rendered videos with a versioned JSON manifest.

A shard is a plain binary file of raw little-endian arrays, each starting at a 64-byte boundary;
the manifest records, per video, each array's shard, byte offset, dtype and shape, plus the 3D
metadata. Nothing in a shard depends on time or machine state, so the same inputs give the same
bytes, and any array can be read on its own with one seek (`np.fromfile(..., offset=)`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from rgpt4d.data.schema import DATASET_FORMAT, SCHEMA_VERSION

MANIFEST = "manifest.json"
ALIGN = 64

# name -> (stored dtype, description)
ARRAYS: dict[str, tuple[str, str]] = {
    "rgb": ("uint8", "[F, H, W, 3] colour frames"),
    "depth": ("float16", "[F, H, W] metres: z of the visible surface in camera coordinates"),
    "flow": (
        "float16",
        "[F, H, W, 2] backward optical flow in pixels (x, y) to the previous frame; frame 0 is zero",
    ),
    "instance": ("uint8", "[F, H, W] 0 = ground, k + 1 = object k of the video's object list"),
    "motion": ("uint8", "[F, H, W] 1 where the visible surface belongs to an object moving at that frame"),
    "boxes": (
        "float32",
        "[F, K, 4] amodal boxes (x0, y0, x1, y1) in pixels, clipped to the image; NaN when out of view",
    ),
    "visible_pixels": ("int32", "[F, K] pixels of each object's instance mask"),
}


def _le(dtype: str) -> np.dtype:
    return np.dtype(dtype).newbyteorder("<")


class ShardWriter:
    """Append arrays to one shard file; `add` returns their manifest records."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "wb")
        self._hash = hashlib.sha256()
        self._offset = 0

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)
        self._offset += len(data)

    def add(self, arrays: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
        records = {}
        for name in sorted(arrays):
            if name not in ARRAYS:
                raise ValueError(f"unknown array {name!r}; expected one of {sorted(ARRAYS)}")
            dtype = ARRAYS[name][0]
            arr = np.ascontiguousarray(arrays[name], dtype=_le(dtype))
            pad = (-self._offset) % ALIGN
            if pad:
                self._write(b"\0" * pad)
            records[name] = {"offset": self._offset, "dtype": dtype, "shape": list(arr.shape)}
            self._write(arr.tobytes())
        return records

    def close(self) -> dict[str, Any]:
        self._file.close()
        return {"bytes": self._offset, "sha256": self._hash.hexdigest()}


def read_array(path: str | os.PathLike, record: dict[str, Any]) -> np.ndarray:
    shape = tuple(int(s) for s in record["shape"])
    count = int(np.prod(shape)) if shape else 1
    arr = np.fromfile(path, dtype=_le(record["dtype"]), count=count, offset=int(record["offset"]))
    if arr.size != count:
        raise ValueError(f"{path}: truncated shard, wanted {count} values at offset {record['offset']}")
    return arr.reshape(shape)


def dump_json(path: str | os.PathLike, obj: Any, compact: bool = False) -> None:
    """Deterministic JSON (keys in the order we build them), UTF-8, strict (no NaN), newline at the end.
    `compact` drops the indentation (the manifest: ~7 kB per video instead of ~15 kB)."""
    if compact:
        text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    else:
        text = json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False)
    Path(path).write_text(text + "\n", encoding="utf-8")


def load_manifest(root: str | os.PathLike) -> dict[str, Any]:
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{root} is not a synthetic 4D dataset: {MANIFEST} is missing (make one with `rgpt4d data make`)"
        )
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != DATASET_FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r} is not {DATASET_FORMAT!r}")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"{path}: schema_version {version} is not supported (this code reads version {SCHEMA_VERSION})"
        )
    return manifest


def round_floats(obj: Any, digits: int = 6) -> Any:
    """Round every float in a JSON-like structure (keeps manifests short and stable)."""
    if isinstance(obj, float):
        return obj if not np.isfinite(obj) else round(obj, digits)
    if isinstance(obj, dict):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [round_floats(v, digits) for v in obj]
    if isinstance(obj, np.ndarray):
        return round_floats(obj.tolist(), digits)
    if isinstance(obj, np.generic):
        return round_floats(obj.item(), digits)
    return obj
