"""Argument checks shared by the launchers: each raises one clear line before any launch."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(name: str, t, *, ndim: int, dtypes=FLOAT_DTYPES, contiguous: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has unsupported dtype {t.dtype}; expected one of {[str(d) for d in dtypes]}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")


def check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dtype != ref.dtype and t.dtype in FLOAT_DTYPES and ref.dtype in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")


def dot_precision(dtype: torch.dtype) -> str | None:
    # fp32 inputs must not be silently truncated to tf32: the tests compare against fp32 torch;
    # None keeps the target's default for 16-bit inputs
    return "ieee" if dtype == torch.float32 else None
