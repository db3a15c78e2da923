"""The one rule that picks an implementation for every op call.

``VARFORMER_BACKEND`` (read at each call) is ``auto`` (default), ``triton`` or ``reference``
(``use_fused_kernels(False)`` forces ``reference`` within a block, ``use_fused_kernels(True)``
forces ``auto``):

* ``auto``: CUDA tensors run the Triton kernels (the reference path where Triton cannot take the
  call, e.g. float64); CPU tensors run the op's best CPU path (memory-efficient PyTorch or C++).
* ``triton``: always the Triton kernels. On CPU tensors this needs ``TRITON_INTERPRET=1`` set
  before the kernels are first imported; that is how the tests run them without a GPU.
* ``reference``: the plain PyTorch composition next to each op (slow, materialises everything).

A request that the chosen backend cannot serve raises an error that says why. A backward runs
on the request its forward saw (so ``with use_fused_kernels(False): loss = f(x)`` followed by
``loss.backward()`` outside the block differentiates the reference path too).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os

import torch

BACKENDS = ("auto", "triton", "reference")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


_OVERRIDE = {"value": None}     # set by use_fused_kernels (a plain global: traceable)


@contextlib.contextmanager
def use_fused_kernels(enabled: bool = True):
    """Within the block, ``enabled=False`` runs every op on its plain PyTorch reference (as
    ``VARFORMER_BACKEND=reference``) and ``enabled=True`` restores the default rule ("auto"),
    whatever the environment says. Nests; process-wide (not per thread)."""
    prev = _OVERRIDE["value"]
    _OVERRIDE["value"] = "auto" if enabled else "reference"
    try:
        yield
    finally:
        _OVERRIDE["value"] = prev


def requested() -> str:
    forced = _OVERRIDE["value"]
    if forced is not None:
        return forced
    value = os.environ.get("VARFORMER_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"VARFORMER_BACKEND={value!r}: expected one of {', '.join(BACKENDS)}")
    return value


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError or a broken install
        return False, f"triton is not importable ({type(exc).__name__}: {exc})"
    try:
        importlib.import_module("varformer.kernels")
    except Exception as exc:
        return False, f"varformer.kernels failed to import ({type(exc).__name__}: {exc})"
    return True, ""


def triton_status(device_type: str) -> tuple[bool, str]:
    """(usable, reason-if-not) for Triton kernels on tensors of ``device_type``."""
    ok, why = _triton_import()
    if not ok:
        return ok, why
    if device_type == "cuda":
        if interpreting():
            return False, "TRITON_INTERPRET=1 is set: Triton kernels run on CPU tensors only"
        return True, ""
    if device_type == "cpu":
        if interpreting():
            return True, ""
        return False, "CPU tensors need TRITON_INTERPRET=1 (set before varformer.kernels import)"
    return False, f"no Triton backend for device type {device_type!r}"


def select(op: str, x: torch.Tensor, cpu_path: str = "cpu", want: str | None = None) -> str:
    """Backend name for one call of ``op`` whose main input is ``x``, for the request ``want``
    (default: ``requested()`` now; a backward passes the request its forward saw).

    Returns ``"triton"``, ``"reference"`` or ``cpu_path`` (the op's CPU implementation)."""
    want = requested() if want is None else want
    if want not in BACKENDS:
        raise ValueError(f"varformer.ops.{op}: backend request {want!r}: expected one of "
                         f"{', '.join(BACKENDS)}")
    dev = x.device.type
    if want == "reference":
        return "reference"
    if want == "triton":
        ok, why = triton_status(dev)
        if not ok:
            raise RuntimeError(f"varformer.ops.{op}: VARFORMER_BACKEND=triton but {why}")
        if x.dtype not in TRITON_DTYPES:
            raise TypeError(f"varformer.ops.{op}: the Triton kernels take float32/float16/"
                            f"bfloat16 inputs, got {x.dtype}; use VARFORMER_BACKEND=reference")
        return "triton"
    # auto
    if dev == "cuda":
        ok, _ = triton_status("cuda")
        return "triton" if ok and x.dtype in TRITON_DTYPES else "reference"
    if dev == "cpu":
        return cpu_path
    return "reference"


def may_use_triton(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` is headed for the Triton kernels (so their limits apply).

    Depends only on the environment, device and dtype, so it traces under torch.compile."""
    want = requested()
    return want == "triton" or (want == "auto" and x.device.type == "cuda"
                                and x.dtype in TRITON_DTYPES)


class BackendReport(dict):
    """``backends()``'s dict ({name: {"available": bool, "reason": str}}) that prints as a
    table: backend | available | reason."""

    def table(self) -> str:
        rows = [("backend", "available", "reason")]
        rows += [(name, "yes" if v.get("available") else "no", str(v.get("reason", "")))
                 if name != "requested" else (name, "", f"VARFORMER_BACKEND={v.get('reason')}")
                 for name, v in self.items()]
        w0, w1 = (max(len(r[i]) for r in rows) for i in (0, 1))
        lines = [f"{a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in rows]
        lines.insert(1, f"{'-' * w0}  {'-' * w1}  {'-' * 6}")
        return "\n".join(lines)

    __str__ = table

    def __repr__(self) -> str:
        return self.table()


def backends() -> BackendReport:
    """What is available here and why not: {name: {"available": bool, "reason": str}}, a
    dict that prints as a table."""
    info = BackendReport()
    for dev in ("cuda", "cpu"):
        ok, why = triton_status(dev)
        if dev == "cuda" and ok and not torch.cuda.is_available():
            ok, why = False, "torch sees no CUDA device"
        info[f"triton-{dev}"] = {"available": ok, "reason": why}
    info["cpu-fused"] = {"available": True,
                         "reason": "memory-efficient PyTorch CPU kernels (flash-attention tiles)"}
    from . import _ext     # C++ CPU ops: which ISA variant runs, build flags, any fallback
    info["csrc-cpu"] = _ext.cpu_backend_info()
    info["reference"] = {"available": True, "reason": "plain PyTorch"}
    info["requested"] = {"available": True, "reason": requested()}
    return info
