"""Input validation shared by all ops: every failure names the argument and what was expected."""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INT32_MAX = 2**31 - 1


def tensor(op: str, name: str, t, *, ndim: int | None = None, dtypes=FLOAT_DTYPES,
           shape_hint: str = "") -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dims {shape_hint}, got shape "
                         f"{tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = "/".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must be {names}, got {t.dtype}")
    return t


def same(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    """Every tensor in ``others`` has ``ref``'s dtype and device."""
    for name, t in others.items():
        if t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; "
                             "all inputs must be on one device")
        if t.dtype != ref.dtype:
            raise TypeError(f"{op}: {name} is {t.dtype} but {ref_name} is {ref.dtype}; "
                            "all inputs must have one dtype")


def dim_equal(op: str, what: str, **sizes: int) -> None:
    vals = set(sizes.values())
    if len(vals) > 1:
        listed = ", ".join(f"{k}={v}" for k, v in sizes.items())
        raise ValueError(f"{op}: {what} must agree, got {listed}")


def positive(op: str, name: str, value: int, what: str) -> None:
    if value <= 0:
        raise ValueError(f"{op}: {name} must have {what} > 0, got {value}")


def scale(op: str, value, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: scale must be a float or None, got {type(value).__name__}")
    if not math.isfinite(value) or value == 0:
        raise ValueError(f"{op}: scale must be finite and non-zero, got {value}")
    return float(value)


def int32_addressable(op: str, name: str, t: torch.Tensor, batch_dims: int = 2) -> None:
    """The per-(batch, head) slice of ``t`` is addressed with int32 offsets in the kernels."""
    span = sum((s - 1) * abs(st) for s, st in zip(t.shape[batch_dims:], t.stride()[batch_dims:]))
    if span > INT32_MAX:
        raise ValueError(f"{op}: {name} {tuple(t.shape)} spans {span} elements per (batch, head) "
                         f"slice; the kernels address at most {INT32_MAX} (int32) per slice")
