"""npufa's dropout mask generator (Philox4x32-10 keyed by seed and offset; project decision 1)."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from . import _C
from ._runtime import sync_threads


def dropout_mask_bytes(numels: int) -> int:
    """Bytes of a bit-packed mask of `numels` elements: ceil(numels/128)*128/8, as torch_npu allocates."""
    return int(_C.dropout_mask_bytes(int(numels)))


def dropout_gen_mask(numels: int, keep_prob: float, seed: int, offset: int = 0) -> torch.Tensor:
    """Bit-packed keep mask (bit k of byte t = element 8t+k, 1 = keep) of `numels` elements.

    The bits are exactly those npu_fusion_attention draws for the same (seed, offset) when it is
    given no dropout_mask, on any machine and at any thread count.
    """
    if not (0.0 < keep_prob <= 1.0):
        raise ValueError(f"dropout_gen_mask: keep_prob must be in (0, 1], got {keep_prob}")
    if numels < 0:
        raise ValueError(f"dropout_gen_mask: numels must be >= 0, got {numels}")
    out = torch.empty(dropout_mask_bytes(numels), dtype=torch.uint8)
    sync_threads()
    _C.dropout_gen_mask(out, int(numels), float(keep_prob), int(seed), int(offset))
    return out


def _npu_dropout_gen_mask(self: torch.Tensor, size: Sequence[int], p: float, seed: int, offset: int,
                          parallel: bool = True, sync: bool = False) -> torch.Tensor:
    """torch_npu._npu_dropout_gen_mask: the mask of prod(size) elements with drop probability p."""
    if not (0.0 <= p < 1.0):
        raise ValueError(f"_npu_dropout_gen_mask: p (drop probability) must be in [0, 1), got {p}")
    return dropout_gen_mask(math.prod(int(s) for s in size), 1.0 - p, seed, offset)
