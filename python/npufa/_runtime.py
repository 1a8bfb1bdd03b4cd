"""Glue shared by every op: threads, tensor hand-off to the C++ core."""
from __future__ import annotations

from typing import Optional

import torch

from . import _C

_threads_override: Optional[int] = None


def set_num_threads(n: Optional[int]) -> None:
    """Threads npufa's kernels use; None or n <= 0 goes back to following torch.get_num_threads()."""
    global _threads_override
    _threads_override = n if n is not None and n > 0 else None


def get_num_threads() -> int:
    return _threads_override if _threads_override is not None else torch.get_num_threads()


def sync_threads() -> None:
    """Size the core's pool before a call: torch's setting unless npufa's was overridden."""
    _C.set_num_threads(get_num_threads())


def arr(t: Optional[torch.Tensor]):
    """A tensor as the core sees it (DLPack needs no autograd history)."""
    if t is None:
        return None
    return t.detach()
