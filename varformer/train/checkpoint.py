"""Crash-safe training checkpoints.

A checkpoint of step s in ``<out>/checkpoints/`` is three files:
``step_<s>.model.safetensors`` (model state dict), ``step_<s>.ema.safetensors`` (EMA weights, a
full state dict loadable by ``VarFormer.load_official``) and ``step_<s>.state.pt`` (step,
optimizer, scheduler, sampler, RNG states of every rank, config). Every file is written to a
temporary file in the same folder, fsync'ed and moved into place with ``os.replace``; the
``latest`` pointer (JSON) is written last, so an interrupted save never replaces the last good
checkpoint. Retention keeps the last ``keep_last`` checkpoints plus every ``keep_every`` steps."""
from __future__ import annotations

import glob
import json
import os
import random
import re
import tempfile
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch import Tensor

LATEST = "latest"
_STEP_RE = re.compile(r"^step_(\d+)\.")


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp_path)`` into a temporary file next to ``path``, fsync, ``os.replace``. On an
    exception the temporary file is removed and ``path`` is untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def _cpu_tensors(sd: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Contiguous CPU copies; tensors sharing storage are cloned (safetensors refuses them)."""
    out, seen = {}, set()
    for k, v in sd.items():
        t = v.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def save_safetensors(sd: Dict[str, Tensor], path: str,
                     metadata: Optional[Dict[str, str]] = None) -> None:
    """Write ``sd`` atomically; ``metadata`` (str -> str) goes into the safetensors header."""
    from safetensors.torch import save_file
    tensors = _cpu_tensors(sd)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


METADATA_KEY = "varformer"   # safetensors header entry: JSON of ``model_metadata``


def model_metadata(cfg: Dict, step: int) -> Dict[str, str]:
    """The safetensors header of a training checkpoint: what ``VarFormer.from_pretrained``
    needs to rebuild the model (``preset``, ``mode``, ``kwargs``: the config's ``model.kwargs``,
    passed to the constructor as they are), plus the whole ``model`` section, stage, name and
    step for the record."""
    m = dict(cfg.get("model") or {})
    info = {"format": 1, "preset": m.get("preset", "full"), "mode": m.get("mode", "official"),
            "kwargs": dict(m.get("kwargs") or {}), "factory": m.get("factory"), "model": m,
            "stage": cfg.get("stage"), "name": cfg.get("name"), "step": int(step)}
    return {METADATA_KEY: json.dumps(info, default=str)}


def read_metadata(path: str) -> Optional[Dict]:
    """The ``model_metadata`` dict of a safetensors file, or None (no header entry)."""
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else None


def load_safetensors(path: str) -> Dict[str, Tensor]:
    from safetensors.torch import load_file
    return load_file(path)


# ---- RNG ---------------------------------------------------------------------------------------
def rng_state() -> Dict:
    """python, numpy, torch CPU and (if present) all CUDA generator states."""
    st = {"python": random.getstate(), "numpy": np.random.get_state(),
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ---- the checkpoint folder ------------------------------------------------------------------------
class CheckpointManager:
    """Saves, finds and prunes the checkpoints in ``folder``."""

    def __init__(self, folder: str, keep_last: int = 3, keep_every: int = 0):
        self.folder, self.keep_last, self.keep_every = folder, keep_last, keep_every

    def paths(self, step: int) -> Dict[str, str]:
        stem = os.path.join(self.folder, f"step_{step:09d}")
        return {"model": stem + ".model.safetensors", "ema": stem + ".ema.safetensors",
                "state": stem + ".state.pt"}

    def save(self, step: int, model_sd: Dict[str, Tensor], ema_sd: Dict[str, Tensor],
             state: Dict, metadata: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        """Write the three files (``metadata`` into both safetensors headers), then the
        ``latest`` pointer, then prune."""
        os.makedirs(self.folder, exist_ok=True)
        p = self.paths(step)
        save_safetensors(model_sd, p["model"], metadata)
        save_safetensors(ema_sd, p["ema"], metadata)
        state = dict(state, step=step)
        atomic_write(p["state"], lambda tmp: torch.save(state, tmp))
        pointer = {"step": step, **{k: os.path.basename(v) for k, v in p.items()}}
        atomic_write(os.path.join(self.folder, LATEST),
                     lambda tmp: _write_text(tmp, json.dumps(pointer) + "\n"))
        self.prune(step)
        return p

    def latest(self) -> Optional[Dict[str, str]]:
        """Paths of the checkpoint ``latest`` points to, or None."""
        ptr = os.path.join(self.folder, LATEST)
        if not os.path.isfile(ptr):
            return None
        with open(ptr) as f:
            info = json.load(f)
        return {"step": int(info["step"]),
                **{k: os.path.join(self.folder, info[k]) for k in ("model", "ema", "state")}}

    def steps(self) -> List[int]:
        found = set()
        for f in os.listdir(self.folder) if os.path.isdir(self.folder) else ():
            m = _STEP_RE.match(f)
            if m:
                found.add(int(m.group(1)))
        return sorted(found)

    def prune(self, current: int) -> None:
        """Keep the last ``keep_last`` steps, every ``keep_every``-th step and ``current``;
        delete other step files and stale temporary files."""
        steps = [s for s in self.steps() if s <= current]
        keep = set(steps[-self.keep_last:]) if self.keep_last > 0 else set()
        keep.add(current)
        if self.keep_every:
            keep |= {s for s in steps if s % self.keep_every == 0}
        for s in self.steps():
            if s not in keep:
                for f in glob.glob(os.path.join(self.folder, f"step_{s:09d}.*")):
                    os.remove(f)
        for f in glob.glob(os.path.join(self.folder, ".step_*.tmp")):
            os.remove(f)


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def load_state(path: str) -> Dict:
    """The ``state.pt`` of a checkpoint (our own file: optimizer, sampler and RNG objects)."""
    return torch.load(path, map_location="cpu", weights_only=False)


__all__ = ["CheckpointManager", "atomic_write", "save_safetensors", "load_safetensors",
           "model_metadata", "read_metadata", "METADATA_KEY",
           "rng_state", "set_rng_state", "load_state"]
