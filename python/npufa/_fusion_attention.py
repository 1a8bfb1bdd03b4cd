"""npu_fusion_attention: torch_npu's training forward, as the torch custom op npufa::npu_fusion_attention."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _C
from ._runtime import arr, sync_threads

_LAYOUTS = ("BSH", "SBH", "BSND", "BNSD", "TND")


def _int_list(x) -> Optional[List[int]]:
    """torch_npu accepts lists, tuples or 1-D tensors for length/prefix arguments."""
    if x is None:
        return None
    if isinstance(x, Tensor):
        return [int(v) for v in x.reshape(-1).tolist()]
    return [int(v) for v in x]


def fusion_attention_shapes(query: Tensor, key: Tensor, value: Tensor, head_num: int,
                            input_layout: str) -> Tuple[List[int], List[int]]:
    """(attention_out shape, softmax_max/sum shape) from the input shapes (spec §1.2, §2.3).

    Shape rules only, for the fake implementation; the C++ core validates real calls.
    """
    layout = input_layout.upper()
    q, k, v = query.shape, key.shape, value.shape
    if layout in ("BSH", "SBH"):
        d = q[2] // head_num
        nkv = k[2] // d if d else 0
        dv = v[2] // nkv if nkv else 0
        b, s = (q[0], q[1]) if layout == "BSH" else (q[1], q[0])
        out = [q[0], q[1], head_num * dv]
        return out, [b, head_num, s, 8]
    if layout == "BSND":
        return [q[0], q[1], q[2], v[3]], [q[0], q[2], q[1], 8]
    if layout == "BNSD":
        return [q[0], q[1], q[2], v[3]], [q[0], q[1], q[2], 8]
    if layout == "TND":
        return [q[0], q[1], v[2]], [q[0], q[1], 8]
    raise ValueError(f"npu_fusion_attention: input_layout must be one of {', '.join(_LAYOUTS)}, got {input_layout!r}")


@torch.library.custom_op("npufa::npu_fusion_attention", mutates_args=(), device_types="cpu")
def _npu_fusion_attention_op(
        query: Tensor, key: Tensor, value: Tensor, head_num: int, input_layout: str,
        pse: Optional[Tensor], padding_mask: Optional[Tensor], atten_mask: Optional[Tensor],
        scale: float, keep_prob: float, pre_tockens: int, next_tockens: int, inner_precise: int,
        prefix: Optional[List[int]], actual_seq_qlen: Optional[List[int]], actual_seq_kvlen: Optional[List[int]],
        sparse_mode: int, gen_mask_parallel: bool, sync: bool, softmax_layout: str,
        sink: Optional[Tensor], dropout_mask: Optional[Tensor], seed: int, offset: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, int, int, int]:
    args = (arr(query), arr(key), arr(value), head_num, input_layout, arr(pse), arr(padding_mask),
            arr(atten_mask), scale, keep_prob, pre_tockens, next_tockens, inner_precise, prefix,
            actual_seq_qlen, actual_seq_kvlen, sparse_mode, softmax_layout, arr(sink), arr(dropout_mask),
            seed, offset)
    out_shape, stat_shape, _ = _C.fusion_attention_fwd(*args)  # validates
    out = query.new_empty(out_shape)
    smax = query.new_empty(stat_shape, dtype=torch.float32)
    ssum = query.new_empty(stat_shape, dtype=torch.float32)
    sync_threads()
    seed, offset, numels = _C.fusion_attention_fwd(*args, out, smax, ssum)
    return out, smax, ssum, query.new_empty(0), seed, offset, numels


@_npu_fusion_attention_op.register_fake
def _(query, key, value, head_num, input_layout, pse, padding_mask, atten_mask, scale, keep_prob,
      pre_tockens, next_tockens, inner_precise, prefix, actual_seq_qlen, actual_seq_kvlen, sparse_mode,
      gen_mask_parallel, sync, softmax_layout, sink, dropout_mask, seed, offset):
    out_shape, stat_shape = fusion_attention_shapes(query, key, value, head_num, input_layout)
    if input_layout.upper() == "TND":
        acc = actual_seq_qlen[0] * actual_seq_kvlen[0]
        for i in range(1, len(actual_seq_qlen)):
            acc += (actual_seq_qlen[i] - actual_seq_qlen[i - 1]) * (actual_seq_kvlen[i] - actual_seq_kvlen[i - 1])
        numels = head_num * acc
    else:
        b = stat_shape[0]
        numels = b * head_num * stat_shape[2] * (key.shape[0] if input_layout.upper() == "SBH" else
                                                  key.shape[2] if input_layout.upper() == "BNSD" else key.shape[1])
    return (query.new_empty(out_shape), query.new_empty(stat_shape, dtype=torch.float32),
            query.new_empty(stat_shape, dtype=torch.float32), query.new_empty(0), seed, offset, numels)


def _draw_seed() -> int:
    """A Philox seed from torch's default generator (decision 1: reproducible under torch.manual_seed)."""
    return int(torch.randint(1, 2 ** 62, (1,)).item())


def npu_fusion_attention(query: Tensor, key: Tensor, value: Tensor, head_num: int, input_layout: str,
                         pse: Optional[Tensor] = None, padding_mask: Optional[Tensor] = None,
                         atten_mask: Optional[Tensor] = None, scale: float = 1., keep_prob: float = 1.,
                         pre_tockens: int = 2147483647, next_tockens: int = 2147483647, inner_precise: int = 0,
                         prefix: Optional[Sequence[int]] = None, actual_seq_qlen: Optional[Sequence[int]] = None,
                         actual_seq_kvlen: Optional[Sequence[int]] = None, sparse_mode: int = 0,
                         gen_mask_parallel: bool = True, sync: bool = False, softmax_layout: str = "",
                         sink: Optional[Tensor] = None, dropout_mask: Optional[Tensor] = None, seed: int = 0,
                         offset: int = 0):
    """torch_npu.npu_fusion_attention on the CPU.

    Returns (attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, numels). With
    keep_prob < 1 and no dropout_mask, seed 0 means "draw one from torch's default generator"; the
    seed used is returned so the backward regenerates the same mask.
    """
    if not isinstance(input_layout, str):
        raise TypeError(f"npu_fusion_attention: input_layout must be a str, got {type(input_layout).__name__}")
    if keep_prob < 1.0 and dropout_mask is None and seed == 0 and keep_prob > 0.0:
        seed = _draw_seed()
    return torch.ops.npufa.npu_fusion_attention(
        query, key, value, int(head_num), input_layout, pse, padding_mask, atten_mask, float(scale),
        float(keep_prob), int(pre_tockens), int(next_tockens), int(inner_precise), _int_list(prefix),
        _int_list(actual_seq_qlen), _int_list(actual_seq_kvlen), int(sparse_mode), bool(gen_mask_parallel),
        bool(sync), softmax_layout, sink, dropout_mask, int(seed), int(offset))
