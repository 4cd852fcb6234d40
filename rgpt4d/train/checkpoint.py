"""Checkpoints that never lose work.

A checkpoint is a folder `step-00000123/` holding
- `model.safetensors`      the model's state_dict;
- `optimizer.safetensors`  every tensor of the optimizer state (keys `state/<param index>/<name>`);
- `trainer.json`           optimizer param groups and scalar state, scheduler state, RNG states
                           (python, numpy, torch CPU, torch CUDA), the data position, and any
                           user metadata (e.g. the resolved config);
- `rng.safetensors`        the torch RNG state tensors;
- any extra JSON files the caller asks for (the training loop adds `config.json`, the resolved config);
- `manifest.json`          size and sha256 of each file above. Written last: a folder without a
                           valid manifest is not a checkpoint.

A sharded checkpoint (`--strategy fsdp`, `save_sharded` / `load_sharded`) holds instead of
model.safetensors and optimizer.safetensors a `dcp/` folder written by torch.distributed.checkpoint
(each process writes its own shards of the model and of the optimizer state, rank 0 the metadata),
and each process's RNG state in `rng-<rank>.safetensors` / `rng-<rank>.json`; `trainer.json` and
the manifest (covering every file, those in dcp/ too) come from rank 0 once all processes wrote.
It can be loaded with another number of processes (DCP reshards; the RNG of a rank that was not
there is left as it is).

Writes are atomic: everything goes to a temporary sibling folder, each file is fsync'ed, the
folder is renamed into place and the parent fsync'ed. A crash mid-write leaves the previous
checkpoint intact (and a `*.tmp-*` folder that the next save removes). `keep_last` old
checkpoints are kept. Loading verifies sizes and hashes; `load_latest` skips a corrupt or
truncated checkpoint with a warning naming it and the problem, and uses the one before.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as tdist
from safetensors.torch import load_file, save_file

try:
    import numpy as np
except ImportError:  # numpy is a dependency, but keep checkpoints usable without it
    np = None

_STEP_RE = re.compile(r"^step-(\d{8})$")
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or incompatible."""


@dataclass
class TrainState:
    """What a training loop needs to continue exactly where it stopped."""

    step: int = 0
    data_position: dict = field(default_factory=dict)  # e.g. {"epoch": 1, "index": 640}
    metadata: dict = field(default_factory=dict)       # e.g. the resolved config


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{pid}/{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalar_state": scalars}


def _optimizer_from_files(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, value in tensors.items():
        _, pid, name = key.split("/", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, st in meta["scalar_state"].items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> tuple[dict, dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    py = random.getstate()
    meta = {"python": [py[0], list(py[1]), py[2]]}
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        meta["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return tensors, meta


def _set_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    if np is not None and "numpy" in meta:
        kind, keys, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


class CheckpointManager:
    """Save / find / load checkpoints under `directory`."""

    def __init__(self, directory: str, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.directory = directory
        self.keep_last = keep_last

    # ---- listing ----------------------------------------------------------------------------
    def checkpoints(self) -> list[tuple[int, str]]:
        """(step, path) of every checkpoint folder, oldest first (validity not checked)."""
        if not os.path.isdir(self.directory):
            return []
        out = []
        for name in os.listdir(self.directory):
            m = _STEP_RE.match(name)
            if m and os.path.isdir(os.path.join(self.directory, name)):
                out.append((int(m.group(1)), os.path.join(self.directory, name)))
        return sorted(out)

    # ---- saving -----------------------------------------------------------------------------
    def save(self, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
             scheduler: Any = None, state: Optional[TrainState] = None,
             extra_json: Optional[dict[str, Any]] = None) -> str:
        """Write checkpoint `step-<state.step>`; `extra_json` {file name: JSON-able value} adds
        files to it (e.g. the resolved config as config.json), covered by the manifest too."""
        state = state or TrainState()
        os.makedirs(self.directory, exist_ok=True)
        self._remove_stale_temporaries()
        final = os.path.join(self.directory, f"step-{state.step:08d}")
        tmp = f"{final}.tmp-{os.getpid()}"
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
        model_sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(model_sd, os.path.join(tmp, "model.safetensors"))
        trainer: dict = {"format_version": FORMAT_VERSION, "step": state.step,
                         "data_position": state.data_position, "metadata": state.metadata}
        if optimizer is not None:
            opt_tensors, opt_meta = _optimizer_to_files(optimizer)
            save_file(opt_tensors, os.path.join(tmp, "optimizer.safetensors"))
            trainer["optimizer"] = opt_meta
        if scheduler is not None:
            trainer["scheduler"] = scheduler.state_dict()
        rng_tensors, rng_meta = _rng_state()
        save_file(rng_tensors, os.path.join(tmp, "rng.safetensors"))
        trainer["rng"] = rng_meta
        self._finish(tmp, final, trainer, extra_json)
        return final

    def save_sharded(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                     state: TrainState, rank: int, extra_json: Optional[dict[str, Any]] = None) -> Optional[str]:
        """The sharded checkpoint `step-<state.step>` of an FSDP model; every process calls it (the
        folder must be on a file system all processes share). Returns the path on rank 0."""
        # start-up: ~2 s (python -X importtime -c "import torch.distributed.checkpoint"); sharded runs only
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        final = os.path.join(self.directory, f"step-{state.step:08d}")
        tmp = f"{final}.tmp-sharded"
        if rank == 0:
            os.makedirs(self.directory, exist_ok=True)
            self._remove_stale_temporaries()
            os.makedirs(tmp)
        tdist.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=os.path.join(tmp, "dcp"))
        rng_tensors, rng_meta = _rng_state()
        save_file(rng_tensors, os.path.join(tmp, f"rng-{rank}.safetensors"))
        with open(os.path.join(tmp, f"rng-{rank}.json"), "w") as f:
            json.dump(rng_meta, f)
        tdist.barrier()
        if rank == 0:
            trainer = {"format_version": FORMAT_VERSION, "step": state.step, "sharded": True,
                       "world": tdist.get_world_size(), "data_position": state.data_position,
                       "metadata": state.metadata, "scheduler": scheduler.state_dict()}
            self._finish(tmp, final, trainer, extra_json)
        tdist.barrier()
        return final if rank == 0 else None

    def _finish(self, tmp: str, final: str, trainer: dict, extra_json: Optional[dict[str, Any]]) -> None:
        """Write trainer.json and the extra JSON files into `tmp`, then the manifest over every file
        in it (fsync'ed), and rename it to `final`."""
        with open(os.path.join(tmp, "trainer.json"), "w") as f:
            json.dump(trainer, f)
        for fname, value in (extra_json or {}).items():
            if fname == "manifest.json" or os.sep in fname or os.path.exists(os.path.join(tmp, fname)):
                raise ValueError(f"extra_json: {fname!r} is not a free file name in a checkpoint")
            with open(os.path.join(tmp, fname), "w") as f:
                json.dump(value, f, indent=1)
        manifest = {"format_version": FORMAT_VERSION, "step": trainer["step"], "files": {}}
        for root, _, names in os.walk(tmp):
            for name in sorted(names):
                path = os.path.join(root, name)
                _fsync_file(path)
                manifest["files"][os.path.relpath(path, tmp)] = {"bytes": os.path.getsize(path),
                                                                 "sha256": _sha256(path)}
            _fsync_dir(root)
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if os.path.exists(final):  # re-saving the same step: replace it
            old = f"{final}.old-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(self.directory)
        self._prune(keep=final)

    def load_sharded(self, path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                     rank: int, restore_rng: bool = True) -> TrainState:
        """Load a sharded checkpoint into an FSDP model (every process calls it; verify it first)."""
        # start-up: ~2 s (python -X importtime -c "import torch.distributed.checkpoint"); sharded runs only
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        with open(os.path.join(path, "trainer.json")) as f:
            trainer = json.load(f)
        if not trainer.get("sharded"):
            raise CheckpointError(f"checkpoint {path} is not sharded (written without --strategy fsdp); resume it "
                                  "with the strategy that wrote it")
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=os.path.join(path, "dcp"))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        scheduler.load_state_dict(trainer["scheduler"])
        rng = os.path.join(path, f"rng-{rank}.safetensors")
        if restore_rng and os.path.isfile(rng):
            with open(os.path.join(path, f"rng-{rank}.json")) as f:
                _set_rng_state(load_file(rng), json.load(f))
        return TrainState(step=trainer["step"], data_position=trainer["data_position"],
                          metadata=trainer["metadata"])

    def load_latest_sharded(self, model, optimizer, scheduler, rank: int) -> Optional[TrainState]:
        """load_latest for an FSDP model: rank 0 finds and verifies the newest valid checkpoint, every
        process loads it."""
        box = [self.latest_valid() if rank == 0 else None]
        tdist.broadcast_object_list(box, src=0)
        if box[0] is None:
            return None
        return self.load_sharded(box[0], model, optimizer, scheduler, rank)

    def _remove_stale_temporaries(self) -> None:
        for name in os.listdir(self.directory):
            if ".tmp-" in name or ".old-" in name:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def _prune(self, keep: str) -> None:
        ckpts = self.checkpoints()
        for _, path in ckpts[: max(0, len(ckpts) - self.keep_last)]:
            if path != keep:
                shutil.rmtree(path, ignore_errors=True)

    # ---- loading ----------------------------------------------------------------------------
    @staticmethod
    def verify(path: str) -> dict:
        """The manifest of a complete, uncorrupted checkpoint; CheckpointError otherwise."""
        mpath = os.path.join(path, "manifest.json")
        if not os.path.isfile(mpath):
            raise CheckpointError(f"checkpoint {path} is incomplete: no manifest.json (interrupted save?)")
        try:
            with open(mpath) as f:
                manifest = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"checkpoint {path}: unreadable manifest.json ({e})") from e
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"checkpoint {path}: format version {manifest.get('format_version')}, "
                                  f"this rgpt4d reads {FORMAT_VERSION}")
        for name, info in manifest["files"].items():
            fpath = os.path.join(path, name)
            if not os.path.isfile(fpath):
                raise CheckpointError(f"checkpoint {path}: {name} is missing")
            size = os.path.getsize(fpath)
            if size != info["bytes"]:
                raise CheckpointError(f"checkpoint {path}: {name} is truncated or altered "
                                      f"({size} bytes, expected {info['bytes']})")
            if _sha256(fpath) != info["sha256"]:
                raise CheckpointError(f"checkpoint {path}: {name} is corrupt (sha256 mismatch)")
        return manifest

    def load(self, path: str, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
             scheduler: Any = None, restore_rng: bool = True, strict: bool = True) -> TrainState:
        """Load one checkpoint into the given objects (verifying it first)."""
        self.verify(path)
        if not os.path.isfile(os.path.join(path, "model.safetensors")):
            raise CheckpointError(f"checkpoint {path} is sharded (written with --strategy fsdp); resume it with "
                                  "--strategy fsdp")
        model_sd = load_file(os.path.join(path, "model.safetensors"))
        missing, unexpected = model.load_state_dict(model_sd, strict=False)
        if strict and (missing or unexpected):
            raise CheckpointError(f"checkpoint {path} does not fit this model: missing {missing}, "
                                  f"unexpected {unexpected}")
        with open(os.path.join(path, "trainer.json")) as f:
            trainer = json.load(f)
        if optimizer is not None:
            if "optimizer" not in trainer:
                raise CheckpointError(f"checkpoint {path} holds no optimizer state")
            tensors = load_file(os.path.join(path, "optimizer.safetensors"))
            optimizer.load_state_dict(_optimizer_from_files(tensors, trainer["optimizer"]))
        if scheduler is not None:
            if "scheduler" not in trainer:
                raise CheckpointError(f"checkpoint {path} holds no scheduler state")
            scheduler.load_state_dict(trainer["scheduler"])
        if restore_rng:
            _set_rng_state(load_file(os.path.join(path, "rng.safetensors")), trainer["rng"])
        return TrainState(step=trainer["step"], data_position=trainer["data_position"],
                          metadata=trainer["metadata"])

    def latest_valid(self) -> Optional[str]:
        """The newest checkpoint that verifies; corrupt ones are reported and skipped."""
        for step, path in reversed(self.checkpoints()):
            try:
                self.verify(path)
                return path
            except CheckpointError as e:
                warnings.warn(f"{e}; falling back to the previous checkpoint", RuntimeWarning, stacklevel=2)
        return None

    def load_latest(self, model, optimizer=None, scheduler=None, restore_rng: bool = True) -> Optional[TrainState]:
        """Load the newest valid checkpoint; None when there is none."""
        path = self.latest_valid()
        if path is None:
            return None
        return self.load(path, model, optimizer, scheduler, restore_rng=restore_rng)
