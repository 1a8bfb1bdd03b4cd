"""Pure-torch float64 reference of torch_npu's inference attention operators.

    npu_prompt_flash_attention (PFA), npu_incre_flash_attention (IFA),
    npu_fused_infer_attention_score (FIA v1), npu_fused_infer_attention_score_v2 (FIA v2),
    _npu_reshape_and_cache (paged KV-cache write).

Written from /work/shared/spec/torch_npu_attention.md (§1, §5-§8, §11, §12), the project decisions of
/work/shared/spec/README.md and npufa's conventions in docs/inference.md (authoritative where the spec
leaves a choice).  It is deliberately simple and slow: every input is first resolved to plain per-batch
float64 tensors (the valid query rows [Nq, Sq_b, D], the valid keys/values [Nkv, Skv_b, D] with the
shared prefix first and paged caches gathered token by token), then for every (batch, query head) the
whole score matrix is materialised, the boolean "masked" matrix is built, and the softmax is taken with
torch.softmax / torch.logsumexp.  It imports nothing from npufa (tests load it by file path).

Conventions (see docs/inference.md):
  * s = q·k (+ q_rope·k_rope) · scale + pse_shift; masked entries do not take part; softmax; o = P·V.
  * a row that sees no key (masked, cut by a band, outside its query window, empty KV): output 0,
    lse = -FLT_MAX; an optional learnable sink adds exp(sink_n) to the softmax denominator and the lse.
  * mask / pse indices are relative to the valid window (row i = i-th valid query of the batch,
    column j = j-th valid key, shared-prefix keys first).
  * decode (query S == 1, non-TND layout) ignores sparse_mode, pre_tokens, next_tokens and the query
    lengths; the mask is applied as is.
  * query head n reads KV head n // (Nq / Nkv).
  * attention_out has the query's dtype (int8 with output quantisation, fp16 for an int8 query); softmax_lse is
    float32 ([0] when not requested).

Quantisation (spec §10, docs/inference.md "Quantisation"):
  * KV antiquant (int8 key/value, float query): k = (k_i8 + offset)·scale and v likewise, exactly in float64,
    then the float computation.  Per-channel / per-tensor / per-head scales and the paged per-token modes 4/5
    are applied to the stored key/value (the pool, for block_table); the per-token modes 1/3 are applied per
    batch, indexed by the token's position in the batch's KV sequence.
  * full int8 (int8 query, key, value): s = (q_i8·k_i8)·dequant_scale1·scale + pse; the probabilities stay
    in float (never rounded to int8); o = Σ p·v_i8 · quant_scale1 · dequant_scale2 / l; output fp16.
  * output quantisation (quant_scale2 / quant_offset2): int8 output, bit for bit with the documented fp16 /
    fp32 formula on the float32 value of the float64 row; rows that see no key stay int8 0.
  * npu_trans_quant_param: the int64 ("uint64") form of fp32 scales.
Invalid input raises ValueError with a short message; the checks are not exhaustive.
"""

import math
import struct
from collections import namedtuple

import torch

__all__ = [
    "npu_prompt_flash_attention",
    "npu_incre_flash_attention",
    "npu_fused_infer_attention_score",
    "npu_fused_infer_attention_score_v2",
    "_npu_reshape_and_cache",
    "npu_trans_quant_param",
]

FLT_MAX = 3.4028234663852886e38  # largest finite float32; lse of a row that sees no key is -FLT_MAX
_F64 = torch.float64

# input_layout -> (layout of query/key/value, layout of attention_out)   (spec §1.2, docs/inference.md)
_LAYOUTS = {
    "BSH": ("BSH", "BSH"),
    "BSND": ("BSND", "BSND"),
    "BNSD": ("BNSD", "BNSD"),
    "BNSD_BSND": ("BNSD", "BSND"),
    "BSH_BNSD": ("BSH", "BNSD"),
    "BSND_BNSD": ("BSND", "BNSD"),
    "BSH_NBSD": ("BSH", "NBSD"),
    "BSND_NBSD": ("BSND", "NBSD"),
    "BNSD_NBSD": ("BNSD", "NBSD"),
    "TND": ("TND", "TND"),
    "TND_NTD": ("TND", "NTD"),
    "NTD_TND": ("NTD", "TND"),
    "NTD": ("NTD", "NTD"),
}
_OP_LAYOUTS = {
    "npu_prompt_flash_attention": ("BSH", "BSND", "BNSD", "BNSD_BSND", "TND"),
    "npu_incre_flash_attention": ("BSH", "BSND", "BNSD"),
    "npu_fused_infer_attention_score": tuple(_LAYOUTS),
    "npu_fused_infer_attention_score_v2": tuple(_LAYOUTS),
}
_MASK_DTYPES = (torch.bool, torch.int8, torch.uint8)


def _fail(op, msg):
    raise ValueError(f"{op}: {msg}")


# ---------------------------------------------------------------------------------------------------
# Argument helpers.
# ---------------------------------------------------------------------------------------------------
def _int_list(x, op, name):
    """A length list given as list/tuple of ints or a 1-D integer tensor -> list of Python ints (None stays None)."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            _fail(op, f"{name} must hold integers, got {x.dtype}")
        vals = x.reshape(-1).tolist()
    else:
        vals = list(x)
    vals = [int(v) for v in vals]
    if not vals:
        _fail(op, f"{name} is empty")
    return vals


def _per_batch(vals, bsz, limit, op, name):
    """Per-batch lengths: a list of one broadcasts, a longer one gives its first B entries; each in [0, limit]."""
    if len(vals) == 1:
        vals = vals * bsz
    elif len(vals) >= bsz:
        vals = vals[:bsz]
    else:
        _fail(op, f"{name} has {len(vals)} entries, needs 1 or at least B = {bsz}")
    for v in vals:
        if not 0 <= v <= limit:
            _fail(op, f"{name} entry {v} is outside [0, {limit}]")
    return vals


def _cumulative(vals, total, op, name):
    """Cumulative lengths (TND) -> list of per-batch (start, end) token ranges."""
    ranges, prev = [], 0
    for c in vals:
        if c < prev:
            _fail(op, f"{name} must be non-decreasing and non-negative, got {vals}")
        ranges.append((prev, c))
        prev = c
    if prev > total:
        _fail(op, f"{name} ends at {prev} but the tensor holds only {total} tokens")
    return ranges


def _heads_first(x, kind, heads, op, name):
    """A tensor in layout `kind` -> float64 [B, N, S, D] (BSH/BSND/BNSD) or [N, T, D] (TND/NTD)."""
    want_dim = 3 if kind in ("BSH", "TND", "NTD") else 4
    if x.dim() != want_dim:
        _fail(op, f"{name} must be {want_dim}-D for layout {kind}, got shape {tuple(x.shape)}")
    x = x.to(_F64)
    if kind == "BSH":
        bsz, s, h = x.shape
        if h % heads:
            _fail(op, f"{name} hidden size {h} is not a multiple of its head count {heads}")
        return x.reshape(bsz, s, heads, h // heads).permute(0, 2, 1, 3)
    if kind == "BSND":
        x = x.permute(0, 2, 1, 3)
    elif kind == "TND":
        x = x.permute(1, 0, 2)
    head_axis = 1 if kind in ("BSND", "BNSD") else 0
    if x.shape[head_axis] != heads:
        _fail(op, f"{name} has {x.shape[head_axis]} heads, expected {heads}")
    return x


def _block_pool(x, nkv, block_size, op, name):
    """Paged block pool (blocknum, block_size, Nkv·D) or (blocknum, Nkv, block_size, D)
    -> float64 [blocknum, Nkv, block_size, D]."""
    if x.dim() == 3:
        if x.shape[1] != block_size or x.shape[2] % nkv:
            _fail(op, f"{name} pool {tuple(x.shape)} does not match block_size {block_size}, Nkv {nkv}")
        return x.to(_F64).reshape(x.shape[0], block_size, nkv, x.shape[2] // nkv).permute(0, 2, 1, 3)
    if x.dim() == 4:
        if x.shape[1] != nkv or x.shape[2] != block_size:
            _fail(op, f"{name} pool {tuple(x.shape)} does not match (blocknum, {nkv}, {block_size}, D)")
        return x.to(_F64)
    _fail(op, f"{name} pool must be 3-D or 4-D, got shape {tuple(x.shape)}")


def _gather_paged(pool, table_row, block_size, length, op, name):
    """Token s of the batch lives in block table_row[s // block_size] at offset s % block_size.
    pool [blocknum, Nkv, block_size, D] -> [Nkv, length, D]."""
    tokens = []
    for s in range(length):
        blk = int(table_row[s // block_size])
        if not 0 <= blk < pool.shape[0]:
            _fail(op, f"block_table entry {blk} is outside [0, {pool.shape[0]}) ({name})")
        tokens.append(pool[blk, :, s % block_size, :])  # [Nkv, D]
    if not tokens:
        return pool.new_zeros((pool.shape[1], 0, pool.shape[3]))
    return torch.stack(tokens, dim=1)


# ---------------------------------------------------------------------------------------------------
# Masks and pse for one batch (all indices relative to the valid query / key windows).
# ---------------------------------------------------------------------------------------------------
def _explicit_mask(mask, b, bsz, sq, skv, decode, op):
    """The user atten_mask for batch b as bool [sq, skv] (True = masked)."""
    if decode:  # (B|1, Skv'), (B|1, 1, Skv'), (B|1, 1, 1, Skv')
        if mask.dim() not in (2, 3, 4) or any(d != 1 for d in mask.shape[1:-1]):
            _fail(op, f"decode atten_mask shape {tuple(mask.shape)} is not (B|1, [1, [1,]] Skv)")
        if mask.shape[0] not in (1, bsz):
            _fail(op, f"atten_mask batch dim {mask.shape[0]} is neither 1 nor B = {bsz}")
        row = mask[b if mask.shape[0] > 1 else 0].reshape(1, -1)
        mb = row
    elif mask.dim() == 2:  # (Sq', Skv')
        mb = mask
    elif mask.dim() in (3, 4):  # (B|1, Sq', Skv'), (B|1, 1, Sq', Skv')
        if mask.shape[0] not in (1, bsz):
            _fail(op, f"atten_mask batch dim {mask.shape[0]} is neither 1 nor B = {bsz}")
        mb = mask[b if mask.shape[0] > 1 else 0]
        if mask.dim() == 4:
            if mb.shape[0] != 1:
                _fail(op, f"atten_mask {tuple(mask.shape)}: inference masks have no head axis")
            mb = mb[0]
    else:
        _fail(op, f"atten_mask must be 2-D, 3-D or 4-D, got shape {tuple(mask.shape)}")
    if mb.shape[0] < sq or mb.shape[1] < skv:
        _fail(op, f"atten_mask {tuple(mask.shape)} is too small for {sq} rows x {skv} key columns")
    return mb[:sq, :skv] != 0


def _in_band(i, j, pre, nxt):
    # left-up coordinates (spec §1.6): key j is visible from row i iff j - i <= next and i - j <= pre
    return ((j - i) <= nxt) & ((i - j) <= pre)


def _prefill_mask(mode, user, sq, skv, pre, nxt, left_padded):
    """Prefill predicate for one batch: bool [sq, skv] (True = masked) or None (nothing masked).
    sq, skv: the batch's valid query rows and keys (keys include the shared prefix)."""
    i = torch.arange(sq, dtype=torch.int64).unsqueeze(1)
    j = torch.arange(skv, dtype=torch.int64).unsqueeze(0)
    if mode == 0:
        if user is None:  # no mask: nothing masked, pre/next ignored
            return None
        if left_padded:  # left padding: mode 0 ignores pre/next
            return user
        return user | ~_in_band(i, j, pre, nxt)
    if mode == 1:
        return user
    if mode == 2:  # left-up causal
        return j > i
    if mode == 3:  # right-down causal
        return j > i + (skv - sq)
    if mode == 4:  # band anchored bottom-right, converted to left-up
        return ~_in_band(i, j, pre - skv + sq, nxt + skv - sq)
    raise AssertionError(mode)


def _pse_block(pse, b, bsz, nq, sq, skv, op):
    """pse_shift (B|1, Nq, Sq', Skv') for batch b -> float64 [Nq, sq, skv]."""
    if pse.dim() != 4:
        _fail(op, f"pse_shift must be 4-D (B|1, Nq, S, Skv), got shape {tuple(pse.shape)}")
    if pse.shape[0] not in (1, bsz):
        _fail(op, f"pse_shift batch dim {pse.shape[0]} is neither 1 nor B = {bsz}")
    p = pse[b if pse.shape[0] > 1 else 0]
    if p.shape[0] != nq or p.shape[1] < sq or p.shape[2] < skv:
        _fail(op, f"pse_shift {tuple(pse.shape)} is too small for Nq {nq}, {sq} rows x {skv} key columns")
    return p[:, :sq, :skv].to(_F64)


# ---------------------------------------------------------------------------------------------------
# Quantisation helpers (spec §10, docs/inference.md "Quantisation", decisions 7-9).
# ---------------------------------------------------------------------------------------------------
_FP19_MASK = 0xFFFFE000  # the fp32 bits a uint64 scale keeps: sign, exponent and the top 10 mantissa bits
_TQP_FLAG = 1 << 46  # set in every npu_trans_quant_param word
_TQP_OFFSET_SHIFT = 37  # a 9-bit offset lives in bits 37-45
_FP16_MAX = 65504.0  # largest finite float16


def _f32_bits(x):
    """The IEEE bit pattern (uint32 as a Python int) of a float32 value."""
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _f32_from_bits(u):
    return struct.unpack("<f", struct.pack("<I", u & 0xFFFFFFFF))[0]


def _round_half_away(x):
    """Round a float to the nearest integer, ties away from zero (C's round())."""
    r = math.floor(abs(x))
    if abs(x) - r >= 0.5:
        r += 1
    return int(math.copysign(r, x))


def _quant_scalar(t, op, name):
    """A full-int8 scale (one value): fp32, or the int64 ("uint64") word of npu_trans_quant_param, whose value is
    bitcast<float32>((u & 0xFFFFFFFF) & 0xFFFFE000).  A word with a packed offset (bits 37-45) is refused."""
    if not isinstance(t, torch.Tensor) or t.numel() != 1:
        _fail(op, f"{name} must be a tensor holding one value")
    if t.dtype == torch.int64:
        word = int(t.reshape(-1)[0]) & 0xFFFFFFFFFFFFFFFF
        if (word >> _TQP_OFFSET_SHIFT) & 0x1FF:
            _fail(op, f"{name} carries a packed offset (bits 37-45), which is not supported")
        return _f32_from_bits(word & _FP19_MASK)
    if t.is_floating_point():
        return float(t.reshape(-1)[0])
    _fail(op, f"{name} must be float32 or int64, got {t.dtype}")


def _check_quant_dtypes(op, query, key, value, full_int8, antiquant):
    """The dtype combination rules (docs/inference.md "Quantisation").  full_int8: {name: tensor or None} of the
    op's three full-int8 scales ({} if the op has none); antiquant: the picked antiquant arguments or None.
    Returns True for the full int8 pipeline (int8 query, key and value)."""
    for t, name in ((key, "key"), (value, "value")):
        if t.dtype == torch.int32:
            _fail(op, f"int4 (int32-packed) {name} is not supported")
    if key.dtype != value.dtype:
        _fail(op, f"key ({key.dtype}) and value ({value.dtype}) must have the same dtype")
    given = [name for name, t in full_int8.items() if t is not None]
    if query.dtype == torch.int8:
        if not full_int8:
            _fail(op, "an int8 query is not supported")
        if key.dtype != torch.int8:
            _fail(op, "an int8 query needs int8 key and value")
        if len(given) != len(full_int8):
            _fail(op, f"an int8 query needs {', '.join(full_int8)}")
        if antiquant is not None:
            _fail(op, "antiquant scales need a float query")
        return True
    if not query.is_floating_point():
        _fail(op, f"query dtype {query.dtype} is not supported")
    if given:
        _fail(op, f"{given[0]} needs an int8 query")
    if key.dtype == torch.int8:
        if antiquant is None:
            _fail(op, "int8 key/value with a float query need antiquant scales")
    elif not key.is_floating_point():
        _fail(op, f"key/value dtype {key.dtype} is not supported")
    elif antiquant is not None:
        _fail(op, "antiquant scales need int8 key/value")
    return False


def _pick_antiquant(op, combined, separate):
    """The antiquant arguments in effect -> {"key": (scale, offset, mode), "value": (scale, offset, mode)} or None.
    combined = (antiquant_scale, antiquant_offset, antiquant_mode): index 0 of the first axis is the key, 1 the
    value, one mode (0 per channel / per tensor, 1 per token) for both.  separate = (key_scale, key_offset,
    value_scale, value_offset, key_mode, value_mode).  The separate arguments win over the combined ones."""
    if separate is not None and any(t is not None for t in separate[:4]):
        ks, ko, vs, vo, kmode, vmode = separate
        kmode, vmode = int(kmode), int(vmode)
        if ks is None or vs is None:
            _fail(op, "key and value antiquant scales must be given together")
        if (ko is None) != (vo is None):
            _fail(op, "key and value antiquant offsets must be given together")
        for m in (kmode, vmode):
            if m not in range(6):
                _fail(op, f"antiquant mode {m} is not in 0-5")
        if kmode != vmode and (kmode, vmode) != (0, 1):
            _fail(op, f"key/value antiquant modes must be equal, or key 0 with value 1; got {kmode}, {vmode}")
        return {"key": (ks, ko, kmode), "value": (vs, vo, vmode)}
    if combined is None:
        return None
    scale, offset, mode = combined
    if scale is None:
        if offset is not None:
            _fail(op, "antiquant_offset needs antiquant_scale")
        return None
    mode = int(mode)
    if mode not in (0, 1):
        _fail(op, f"antiquant_mode {mode} is not 0 or 1")
    for t, name in ((scale, "antiquant_scale"), (offset, "antiquant_offset")):
        if t is not None and (t.dim() == 0 or t.shape[0] != 2):
            _fail(op, f"{name} must have a first axis of 2 (key, value), got shape {tuple(t.shape)}")
    return {"key": (scale[0], None if offset is None else offset[0], mode),
            "value": (scale[1], None if offset is None else offset[1], mode)}


def _antiquant_param(t, mode, *, nkv, d, bsz, pool, tnd, op, name):
    """One antiquant scale or offset -> (per_token, float64 tensor):
      per_token False: broadcastable to the stored key/value, i.e. [B, Nkv, S, D], [Nkv, T, D] or, with
          block_table, the pool [blocknum, Nkv, block_size, D];
      per_token True (modes 1 and 3): [B, 1 or Nkv, KV_S], indexed by the token's position in its batch.
    pool: (blocknum, block_size) with block_table, else None."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        _fail(op, f"{name} must be a float tensor")
    shape, x = tuple(t.shape), t.to(_F64)
    if mode in (1, 3) and tnd and pool is None:
        _fail(op, f"per-token antiquant (mode {mode}) needs a batched layout or block_table")
    if mode in (4, 5) and pool is None:
        _fail(op, f"antiquant mode {mode} (per token, paged) needs block_table")
    if mode == 0 and x.numel() == 1:  # per tensor
        return False, x.reshape(())
    if mode == 0 and shape in ((1, nkv, 1, d), (1, nkv, d), (nkv, 1, d), (nkv, d), (1, nkv * d), (nkv * d,)):
        return False, x.reshape(nkv, 1, d)  # per channel: [n, d]
    if mode == 1 and len(shape) in (2, 3) and shape[:-1] in ((bsz,), (1, bsz)):  # per token: (1, B, KV_S), (B, KV_S)
        return True, x.reshape(bsz, 1, shape[-1])
    if mode == 2 and shape == (nkv,):  # per tensor + per head: [n]
        return False, x.reshape(nkv, 1, 1)
    if mode == 3 and len(shape) == 3 and shape[:2] == (bsz, nkv):  # per token + per head: [b, n, s]
        return True, x
    if mode == 4 and shape == pool:  # per token, paged: [blk, off]
        return False, x.reshape(pool[0], 1, pool[1], 1)
    if mode == 5 and pool is not None and shape == (pool[0], nkv, pool[1]):  # per token + per head, paged
        return False, x.unsqueeze(-1)
    where = f"Nkv {nkv}, D {d}, B {bsz}" + ("" if pool is None else f", pool {pool}")
    _fail(op, f"{name} of shape {shape} does not fit antiquant mode {mode} ({where})")


_Antiquant = namedtuple("_Antiquant", "per_token scale offset")  # resolved antiquant of the key or the value


def _resolve_antiquant(picked, *, nkv, dk, dv, bsz, pool, tnd, op):
    """{"key"/"value": (scale, offset, mode)} -> {"key"/"value": _Antiquant} (see _antiquant_param; offset None = 0).
    An offset must have the form of its scale."""
    out = {}
    for which, d in (("key", dk), ("value", dv)):
        scale, offset, mode = picked[which]
        kw = dict(mode=mode, nkv=nkv, d=d, bsz=bsz, pool=pool, tnd=tnd, op=op)
        per_token, sc = _antiquant_param(scale, name=f"{which} antiquant scale", **kw)
        off = None
        if offset is not None:
            off_per_token, off = _antiquant_param(offset, name=f"{which} antiquant offset", **kw)
            if off_per_token != per_token or off.shape != sc.shape:
                _fail(op, f"the {which} antiquant offset {tuple(offset.shape)} does not match its scale "
                          f"{tuple(scale.shape)}")
        out[which] = _Antiquant(per_token, sc, off)
    return out


def _dequant(x, scale, offset):
    """k = (k_int8 + offset) · scale, in float64 (offset None = 0)."""
    return (x if offset is None else x + offset) * scale


def _dequant_positions(x, aq, b, start, end, op, which):
    """Per-token antiquant of batch b's tokens x [Nkv, L, D], which sit at positions [start, end) of its KV sequence."""
    scale, offset = aq.scale, aq.offset
    if scale.shape[-1] < end:
        _fail(op, f"the per-token {which} antiquant scale covers {scale.shape[-1]} positions, batch {b} reads {end}")
    sc = scale[b, :, start:end].unsqueeze(-1)  # [1 or Nkv, L, 1]
    off = None if offset is None else offset[b, :, start:end].unsqueeze(-1)
    return _dequant(x, sc, off)


def _to_fp16(x):
    """Values -> the nearest float16, rounded once from their exact (float64) value: ties to even, beyond the
    fp16 range ±inf.  x / ulp and the product by ulp are exact (powers of two), torch.round rounds half to even."""
    x = x.to(_F64)
    _, e = torch.frexp(x)  # |x| in [2**(e-1), 2**e)
    e = torch.clamp(e - 1, min=-14)  # fp16 exponent of x (subnormals have the spacing of the 2**-14 binade)
    ulp = torch.ldexp(torch.ones_like(x), e - 10)  # spacing of fp16 values there (10 mantissa bits)
    y = torch.round(x / ulp) * ulp
    y = torch.where(y.abs() > _FP16_MAX, torch.copysign(torch.full_like(x, math.inf), x), y)
    return y.to(torch.float16)


def _quantise_output(o, seen, scale, offset, channel_shape, op, names):
    """Output quantisation (docs/inference.md): o float64 in the canonical output layout ([T, Nq, Dv] or
    [B, Nq, Sq, Dv]); seen bool ([T, Nq] or [B, Nq, Sq]): rows that saw a key; channel_shape: how the Nq·Dv
    channels c = n·Dv + d broadcast over o.  Returns int8."""
    scale_name, offset_name = names
    nchan = math.prod(channel_shape)
    for t, name in ((scale, scale_name), (offset, offset_name)):
        if t is not None and (not isinstance(t, torch.Tensor) or not t.is_floating_point()):
            _fail(op, f"{name} must be a float tensor")
    if scale.numel() not in (1, nchan):
        _fail(op, f"{scale_name} must hold 1 or Nq*Dv = {nchan} values, got {scale.numel()}")
    if offset is not None and offset.numel() != scale.numel():
        _fail(op, f"{offset_name} must hold as many values as {scale_name}")
    o32 = o.to(torch.float32)  # "o": the float32 row
    scale32 = scale.to(torch.float32)  # scales and offsets are read as fp32
    offset32 = None if offset is None else offset.to(torch.float32)
    if scale.numel() == 1:  # per tensor, fp16 arithmetic: y = fp16(fp16(fp16(o)·fp16(scale)) + fp16(offset))
        s16 = _to_fp16(scale32.reshape(()))
        off16 = _to_fp16(torch.zeros(()) if offset32 is None else offset32.reshape(()))
        prod = _to_fp16(_to_fp16(o32).to(_F64) * s16.to(_F64))  # the product of two fp16 is exact in float64
        y = _to_fp16(prod.to(_F64) + off16.to(_F64))  # and so is their sum
    else:  # per channel: y = fp16(o·scale[c] + offset[c]), fp32 multiply, then fp32 add
        t = o32 * scale32.reshape(channel_shape)
        if offset32 is not None:
            t = t + offset32.reshape(channel_shape)
        y = _to_fp16(t)
    q = torch.round(y.to(_F64)).clamp(-128, 127)  # round half to even, saturate to int8
    q = torch.nan_to_num(q, nan=0.0)
    q = torch.where(seen.unsqueeze(-1), q, torch.zeros((), dtype=_F64))  # rows that see no key: 0, not quantised
    return q.to(torch.int8)


# ---------------------------------------------------------------------------------------------------
# The math of one (batch, query head).
# ---------------------------------------------------------------------------------------------------
def _attend_head(q, k, v, scale, pse, masked, sink):
    """q [Sq, D], k [Skv, D], v [Skv, Dv] float64; pse [Sq, Skv] or None; masked bool [Sq, Skv] or None;
    sink: float or None.  Returns out [Sq, Dv], lse [Sq], has_key bool [Sq] (the row sees at least one key)."""
    sq, skv = q.shape[0], k.shape[0]
    s = (q @ k.T) * scale
    if pse is not None:
        s = s + pse
    if masked is None:
        masked = torch.zeros((sq, skv), dtype=torch.bool)
    has_key = (~masked).any(dim=1)  # [Sq]
    s = s.masked_fill(masked, float("-inf"))
    if sink is not None:  # an extra logit in the denominator only
        s = torch.cat([s, torch.full((sq, 1), sink, dtype=_F64)], dim=1)
    p = torch.softmax(s, dim=1)
    lse = torch.logsumexp(s, dim=1)
    if sink is not None:
        p = p[:, :skv]
    p = torch.where(has_key.unsqueeze(1), p, torch.zeros((), dtype=_F64))  # rows without a key: 0 (no NaN)
    out = p @ v
    lse = torch.where(has_key, lse, torch.full((), -FLT_MAX, dtype=_F64))
    return out, lse, has_key


# ---------------------------------------------------------------------------------------------------
# The common inference computation.
# ---------------------------------------------------------------------------------------------------
def _infer(op, query, key, value, *, input_layout, num_heads, num_key_value_heads, scale, pse_shift=None,
           atten_mask=None, act_q=None, act_kv=None, block_table=None, block_size=0, query_padding_size=None,
           kv_padding_size=None, key_shared_prefix=None, value_shared_prefix=None, actual_shared_prefix_len=None,
           query_rope=None, key_rope=None, sparse_mode=0, pre_tokens=2147483647, next_tokens=2147483647,
           inner_precise=None, learnable_sink=None, want_lse=False, full_int8=None, antiquant=None,
           quant_scale2=None, quant_offset2=None, quant_names=("quant_scale2", "quant_offset2")):
    """Returns (attention_out in the output layout, lse float32 or None).
    Quantisation: full_int8 {name: tensor or None} holds the op's dequant_scale1, quant_scale1, dequant_scale2
    ({} if it has none); antiquant the picked KV antiquant arguments (_pick_antiquant) or None; quant_scale2 /
    quant_offset2 (named quant_names in messages) the output quantisation.  attention_out is int8 with
    quant_scale2, else fp16 for an int8 query, else the query dtype."""
    # ---- layout, heads ----
    if input_layout not in _OP_LAYOUTS[op]:
        _fail(op, f"input_layout {input_layout!r} is not one of {_OP_LAYOUTS[op]}")
    in_kind, out_kind = _LAYOUTS[input_layout]
    tnd = in_kind in ("TND", "NTD")
    full_int8 = {} if full_int8 is None else full_int8
    int8_qkv = _check_quant_dtypes(op, query, key, value, full_int8, antiquant)  # the full int8 pipeline
    if quant_offset2 is not None and quant_scale2 is None:
        _fail(op, f"{quant_names[1]} needs {quant_names[0]}")
    if want_lse and out_kind == "NBSD":
        _fail(op, f"softmax_lse is not available with input_layout {input_layout}")
    nq = int(num_heads)
    nkv = nq if int(num_key_value_heads) == 0 else int(num_key_value_heads)
    if nq <= 0 or nkv <= 0 or nq % nkv:
        _fail(op, f"num_heads {nq} must be a positive multiple of num_key_value_heads {nkv}")
    group = nq // nkv  # query head n reads KV head n // group

    q = _heads_first(query, in_kind, nq, op, "query")  # [B, Nq, Sq, D] or [Nq, T, D]
    paged = block_table is not None
    if paged:
        block_size = int(block_size)
        if block_size < 1:
            _fail(op, "block_table needs block_size >= 1")
        if block_table.dim() != 2 or block_table.is_floating_point():
            _fail(op, f"block_table must be a 2-D integer tensor, got {tuple(block_table.shape)} {block_table.dtype}")
        k_all = _block_pool(key, nkv, block_size, op, "key")  # [blocknum, Nkv, block_size, D]
        v_all = _block_pool(value, nkv, block_size, op, "value")
        if v_all.shape[0] != k_all.shape[0]:
            _fail(op, "key and value pools have different block counts")
    else:
        k_all = _heads_first(key, in_kind, nkv, op, "key")  # [B, Nkv, Skv, D] or [Nkv, Tkv, D]
        v_all = _heads_first(value, in_kind, nkv, op, "value")
        if k_all.shape[:-1] != v_all.shape[:-1]:
            _fail(op, f"key {tuple(key.shape)} and value {tuple(value.shape)} differ beyond the head dim")
    if (query_rope is None) != (key_rope is None):
        _fail(op, "query_rope and key_rope must be given together")
    rope = query_rope is not None
    if rope and int8_qkv:
        _fail(op, "query_rope/key_rope cannot be combined with an int8 query")
    if rope and not (query_rope.is_floating_point() and key_rope.is_floating_point()):
        _fail(op, "query_rope and key_rope must be float tensors")
    if rope:
        q_rope = _heads_first(query_rope, in_kind, nq, op, "query_rope")
        k_rope = (_block_pool(key_rope, nkv, block_size, op, "key_rope") if paged
                  else _heads_first(key_rope, in_kind, nkv, op, "key_rope"))
        if q_rope.shape[:-1] != q.shape[:-1] or k_rope.shape[:-1] != k_all.shape[:-1]:
            _fail(op, "query_rope/key_rope must match query/key except in the head dim")
        if q_rope.shape[-1] != k_rope.shape[-1]:
            _fail(op, "query_rope and key_rope head dims differ")
    if q.shape[-1] != k_all.shape[-1]:
        _fail(op, f"query head dim {q.shape[-1]} != key head dim {k_all.shape[-1]}")
    dv = v_all.shape[-1]

    # ---- batches and valid query windows (token ranges of the query tensor) ----
    if tnd:
        total_q = q.shape[1]
        if act_q is None:
            _fail(op, f"layout {input_layout} needs the cumulative query lengths")
        q_win = _cumulative(act_q, total_q, op, "query lengths")
        bsz = len(q_win)
        decode = False
        if query_padding_size is not None or kv_padding_size is not None:
            _fail(op, f"left padding is not supported with layout {input_layout}")
    else:
        bsz, sq = q.shape[0], q.shape[2]
        if not paged and k_all.shape[0] != bsz:
            _fail(op, f"key batch {k_all.shape[0]} != query batch {bsz}")
        decode = sq == 1 and op != "npu_prompt_flash_attention"  # PFA is always a prefill (§5)
        if decode or act_q is None:  # decode ignores the query lengths
            q_win = [(0, sq)] * bsz
        else:
            lens = _per_batch(act_q, bsz, sq, op, "query lengths")
            if query_padding_size is not None:  # left padding: [Sq - qpad - len, Sq - qpad)
                qpad = max(_int_list(query_padding_size, op, "query_padding_size")[0], 0)
                q_win = [(sq - qpad - n, sq - qpad) for n in lens]
                if any(start < 0 for start, _ in q_win):
                    _fail(op, "query_padding_size + query length exceeds the query S")
            else:
                q_win = [(0, n) for n in lens]
    q_left = (not tnd and not decode and act_q is not None and query_padding_size is not None)
    kv_left = (not tnd and act_kv is not None and kv_padding_size is not None)
    left_padded = q_left or kv_left
    if op == "npu_incre_flash_attention" and not decode:
        _fail(op, f"the query S must be 1, got {q.shape[2]}")

    # ---- each batch's own valid keys: kv_win[b] = (start, end) in the key tensor, or None (no key) ----
    if paged:
        if left_padded:
            _fail(op, "block_table cannot be combined with left padding")
        if act_kv is None:
            _fail(op, "block_table needs the KV lengths")
        if block_table.shape[0] != bsz:
            _fail(op, f"block_table has {block_table.shape[0]} rows, B = {bsz}")
        kv_len = _per_batch(act_kv, bsz, block_table.shape[1] * block_size, op, "KV lengths")
        kv_win = [(0, n) for n in kv_len]
    elif tnd:
        if act_kv is None:
            _fail(op, f"layout {input_layout} without block_table needs the cumulative KV lengths")
        kv_win = _cumulative(act_kv, k_all.shape[1], op, "KV lengths")
        if len(kv_win) != bsz:
            _fail(op, "the cumulative query and KV length lists differ in length")
    else:
        skv = k_all.shape[2]
        if act_kv is None:
            kv_win = [(0, skv)] * bsz
        else:
            lens = _per_batch(act_kv, bsz, skv, op, "KV lengths")
            if kv_left:  # left padding: [Skv - kvpad - len, Skv - kvpad)
                kvpad = max(_int_list(kv_padding_size, op, "kv_padding_size")[0], 0)
                kv_win = []
                for n in lens:
                    start, end = skv - kvpad - n, skv - kvpad
                    if start < 0 and not decode:
                        _fail(op, "kv_padding_size + KV length exceeds the KV S")
                    kv_win.append(None if start < 0 else (start, end))  # decode: that batch gets 0 / -FLT_MAX
            else:
                kv_win = [(0, n) for n in lens]

    def own_keys(t_all, b):
        """The batch's own valid tokens of a key-like tensor -> [Nkv, L, d]."""
        start, end = kv_win[b]
        if paged:
            return _gather_paged(t_all, block_table[b], block_size, end, op, "key/value")
        if tnd:
            return t_all[:, start:end]
        return t_all[b, :, start:end]

    # ---- shared prefix (seen by every batch before its own keys) ----
    if key_shared_prefix is not None or value_shared_prefix is not None:
        if key_shared_prefix is None or value_shared_prefix is None:
            _fail(op, "key_shared_prefix and value_shared_prefix must be given together")
        if tnd or paged or left_padded or rope:
            _fail(op, "a shared prefix cannot be combined with TND layouts, block_table, left padding or rope")
        if antiquant is not None:
            _fail(op, "a shared prefix cannot be combined with KV antiquant")
        if int8_qkv and (key_shared_prefix.dtype != torch.int8 or value_shared_prefix.dtype != torch.int8):
            _fail(op, "with an int8 query the shared prefixes must be int8")
        kp = _heads_first(key_shared_prefix, in_kind, nkv, op, "key_shared_prefix")  # [1, Nkv, Sp, D]
        vp = _heads_first(value_shared_prefix, in_kind, nkv, op, "value_shared_prefix")
        if kp.shape[0] != 1 or vp.shape[0] != 1 or kp.shape[2] != vp.shape[2]:
            _fail(op, "shared prefixes must have batch 1 and equal S")
        if kp.shape[3] != k_all.shape[3] or vp.shape[3] != dv:
            _fail(op, "shared prefix head dims differ from key/value")
        sp = kp.shape[2]
        lp = sp if actual_shared_prefix_len is None else _int_list(actual_shared_prefix_len, op,
                                                                   "actual_shared_prefix_len")[0]
        if not 0 <= lp <= sp:
            _fail(op, f"actual_shared_prefix_len {lp} is outside [0, {sp}]")
        prefix_k, prefix_v = kp[0, :, :lp], vp[0, :, :lp]
    else:
        if actual_shared_prefix_len is not None:
            _fail(op, "actual_shared_prefix_len needs key_shared_prefix / value_shared_prefix")
        prefix_k = prefix_v = None

    # ---- KV antiquant: scales of the stored key/value are applied now, the per-token ones per batch below ----
    key_aq = value_aq = None
    if antiquant is not None:
        aq = _resolve_antiquant(antiquant, nkv=nkv, dk=k_all.shape[-1], dv=dv, bsz=bsz,
                                pool=(k_all.shape[0], block_size) if paged else None, tnd=tnd, op=op)
        key_aq, value_aq = aq["key"], aq["value"]
        if not key_aq.per_token:
            k_all = _dequant(k_all, key_aq.scale, key_aq.offset)
        if not value_aq.per_token:
            v_all = _dequant(v_all, value_aq.scale, value_aq.offset)

    # ---- full int8: s = (q_i8·k_i8)·dequant_scale1·scale + pse,  o = Σ p·v_i8 · quant_scale1·dequant_scale2 / l ----
    score_scale, out_factor = scale, None
    if int8_qkv:
        dequant_scale1, quant_scale1, dequant_scale2 = (_quant_scalar(t, op, name) for name, t in full_int8.items())
        score_scale = dequant_scale1 * scale
        out_factor = quant_scale1 * dequant_scale2

    # ---- sparse mode (prefill only) ----
    mode = int(sparse_mode)
    pre, nxt = int(pre_tokens), int(next_tokens)
    if atten_mask is not None and atten_mask.dtype not in _MASK_DTYPES:
        _fail(op, f"atten_mask dtype {atten_mask.dtype} is not bool, int8 or uint8")
    if not decode:
        if op == "npu_prompt_flash_attention" and 10 <= mode <= 14:
            mode -= 10  # PFA alias: 10-14 = 0-4 in high precision
        if mode == 9:
            _fail(op, "sparse_mode 9 (tree mask) is not supported")
        if mode not in (0, 1, 2, 3, 4):
            _fail(op, f"sparse_mode {sparse_mode} is not supported")
        if mode in (1, 2, 3, 4) and atten_mask is None:
            _fail(op, f"sparse_mode {mode} needs atten_mask")
        if mode in (2, 3, 4) and (atten_mask.dim() not in (2, 3, 4) or tuple(atten_mask.shape[-2:]) != (2048, 2048)
                                  or any(d != 1 for d in atten_mask.shape[:-2])):
            _fail(op, f"sparse_mode {mode} needs the compressed 2048x2048 atten_mask, got {tuple(atten_mask.shape)}")
        if mode in (0, 4) and atten_mask is not None and pre < 0 and nxt < 0:
            _fail(op, "pre_tokens and next_tokens are both negative")
        band = mode == 4 or (mode == 0 and atten_mask is not None and not left_padded)
        if quant_scale2 is not None and band and (pre < 0 or nxt < 0):
            _fail(op, f"an int8 output ({quant_names[0]}) cannot be combined with a band with negative "
                      "pre/next tokens")
    if inner_precise is not None:
        allowed = (0, 1) if decode else (0, 1, 2, 3)
        if int(inner_precise) not in allowed:
            _fail(op, f"inner_precise {inner_precise} is not in {allowed}")
    if learnable_sink is not None and tuple(learnable_sink.shape) != (nq,):
        _fail(op, f"learnable_sink must have shape ({nq},), got {tuple(learnable_sink.shape)}")
    sink = None if learnable_sink is None else learnable_sink.to(_F64)

    # ---- per batch, per query head ----
    if tnd:
        out = torch.zeros((q.shape[1], nq, dv), dtype=_F64)  # [T, Nq, Dv]
        lse = torch.full((q.shape[1], nq), -FLT_MAX, dtype=_F64)
    else:
        out = torch.zeros((bsz, nq, q.shape[2], dv), dtype=_F64)  # [B, Nq, Sq, Dv]
        lse = torch.full((bsz, nq, q.shape[2]), -FLT_MAX, dtype=_F64)
    seen = torch.zeros(lse.shape, dtype=torch.bool)  # rows that see at least one key
    for b in range(bsz):
        qs, qe = q_win[b]
        if qe == qs or kv_win[b] is None:
            continue  # no valid row, or (decode, left padding) no valid key: 0 / -FLT_MAX
        q_b = q[:, qs:qe] if tnd else q[b, :, qs:qe]  # [Nq, Sq_b, D]
        k_b, v_b = own_keys(k_all, b), own_keys(v_all, b)  # [Nkv, L, D]
        if key_aq is not None and key_aq.per_token:  # per-token antiquant: by the token's position in its KV sequence
            k_b = _dequant_positions(k_b, key_aq, b, *kv_win[b], op, "key")
        if value_aq is not None and value_aq.per_token:
            v_b = _dequant_positions(v_b, value_aq, b, *kv_win[b], op, "value")
        if prefix_k is not None:
            k_b, v_b = torch.cat([prefix_k, k_b], dim=1), torch.cat([prefix_v, v_b], dim=1)
        if rope:
            q_b = torch.cat([q_b, q_rope[:, qs:qe] if tnd else q_rope[b, :, qs:qe]], dim=2)
            k_b = torch.cat([k_b, own_keys(k_rope, b)], dim=2)
        sq_b, skv_b = q_b.shape[1], k_b.shape[1]

        user = None  # the explicit mask is read in decode and in modes 0/1 (2-4 only need the compressed marker)
        if atten_mask is not None and (decode or mode in (0, 1)):
            user = _explicit_mask(atten_mask, b, bsz, sq_b, skv_b, decode, op)
        masked = user if decode else _prefill_mask(mode, user, sq_b, skv_b, pre, nxt, left_padded)
        pse_b = None if pse_shift is None else _pse_block(pse_shift, b, bsz, nq, sq_b, skv_b, op)

        for n in range(nq):
            o, l, has_key = _attend_head(q_b[n], k_b[n // group], v_b[n // group], score_scale,
                                         None if pse_b is None else pse_b[n], masked,
                                         None if sink is None else float(sink[n]))
            if out_factor is not None:
                o = o * out_factor
            if tnd:
                out[qs:qe, n], lse[qs:qe, n], seen[qs:qe, n] = o, l, has_key
            else:
                out[b, n, qs:qe], lse[b, n, qs:qe], seen[b, n, qs:qe] = o, l, has_key

    # ---- output quantisation (int8), or the output dtype ----
    if quant_scale2 is not None:
        out = _quantise_output(out, seen, quant_scale2, quant_offset2, (nq, dv) if tnd else (nq, 1, dv), op,
                               quant_names)
    else:
        out = out.to(torch.float16 if int8_qkv else query.dtype)

    # ---- output layout ----
    if out_kind == "BSH":
        res = out.permute(0, 2, 1, 3).reshape(bsz, out.shape[2], nq * dv)
    elif out_kind == "BSND":
        res = out.permute(0, 2, 1, 3)
    elif out_kind == "NBSD":
        res = out.permute(1, 0, 2, 3)
    elif out_kind == "NTD":
        res = out.permute(1, 0, 2)
    else:  # BNSD, TND
        res = out
    res = res.contiguous()
    lse_out = lse.unsqueeze(-1).to(torch.float32) if want_lse else None  # [B, Nq, Sq, 1] or [T, Nq, 1]
    return res, lse_out


def _empty_lse():
    return torch.empty((0,), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------
# The operators (torch_npu signatures and defaults).
# ---------------------------------------------------------------------------------------------------
def npu_prompt_flash_attention(query, key, value, *, padding_mask=None, atten_mask=None, pse_shift=None,
                               actual_seq_lengths=None, deq_scale1=None, quant_scale1=None, deq_scale2=None,
                               quant_scale2=None, quant_offset2=None, num_heads=1, scale_value=1.0,
                               pre_tokens=2147483647, next_tokens=0, input_layout="BSH", num_key_value_heads=0,
                               actual_seq_lengths_kv=None, sparse_mode=0):
    """PFA (spec §5). padding_mask is reserved and ignored. Returns attention_out."""
    op = "npu_prompt_flash_attention"
    out, _ = _infer(op, query, key, value, input_layout=input_layout, num_heads=num_heads,
                    num_key_value_heads=num_key_value_heads, scale=scale_value, pse_shift=pse_shift,
                    atten_mask=atten_mask, act_q=_int_list(actual_seq_lengths, op, "actual_seq_lengths"),
                    act_kv=_int_list(actual_seq_lengths_kv, op, "actual_seq_lengths_kv"),
                    sparse_mode=sparse_mode, pre_tokens=pre_tokens, next_tokens=next_tokens,
                    full_int8={"deq_scale1": deq_scale1, "quant_scale1": quant_scale1, "deq_scale2": deq_scale2},
                    quant_scale2=quant_scale2, quant_offset2=quant_offset2)
    return out


def npu_incre_flash_attention(query, key, value, *, padding_mask=None, atten_mask=None, pse_shift=None,
                              actual_seq_lengths=None, antiquant_scale=None, antiquant_offset=None, block_table=None,
                              dequant_scale1=None, quant_scale1=None, dequant_scale2=None, quant_scale2=None,
                              quant_offset2=None, kv_padding_size=None, num_heads=1, scale_value=1.0,
                              input_layout="BSH", num_key_value_heads=0, block_size=0, inner_precise=1):
    """IFA (spec §6): query S = 1; actual_seq_lengths are the per-batch KV lengths; antiquant only in the combined
    per-channel / per-tensor form (IFA has no antiquant_mode). Returns attention_out."""
    op = "npu_incre_flash_attention"
    for name, t in (("dequant_scale1", dequant_scale1), ("quant_scale1", quant_scale1),
                    ("dequant_scale2", dequant_scale2)):
        if t is not None:
            _fail(op, f"{name} is not supported: IFA has no full int8 pipeline")
    if query.dtype == torch.int8:
        _fail(op, "an int8 query is not supported (IFA has no full int8 pipeline)")
    out, _ = _infer(op, query, key, value, input_layout=input_layout, num_heads=num_heads,
                    num_key_value_heads=num_key_value_heads, scale=scale_value, pse_shift=pse_shift,
                    atten_mask=atten_mask, act_kv=_int_list(actual_seq_lengths, op, "actual_seq_lengths"),
                    block_table=block_table, block_size=block_size, kv_padding_size=kv_padding_size,
                    inner_precise=inner_precise,
                    antiquant=_pick_antiquant(op, (antiquant_scale, antiquant_offset, 0), None),
                    quant_scale2=quant_scale2, quant_offset2=quant_offset2)
    return out


def npu_fused_infer_attention_score(query, key, value, *, pse_shift=None, atten_mask=None, actual_seq_lengths=None,
                                    actual_seq_lengths_kv=None, dequant_scale1=None, quant_scale1=None,
                                    dequant_scale2=None, quant_scale2=None, quant_offset2=None, antiquant_scale=None,
                                    antiquant_offset=None, key_antiquant_scale=None, key_antiquant_offset=None,
                                    value_antiquant_scale=None, value_antiquant_offset=None, block_table=None,
                                    query_padding_size=None, kv_padding_size=None, key_shared_prefix=None,
                                    value_shared_prefix=None, actual_shared_prefix_len=None, query_rope=None,
                                    key_rope=None, key_rope_antiquant_scale=None, num_heads=1, scale=1.0,
                                    pre_tokens=2147483647, next_tokens=2147483647, input_layout="BSH",
                                    num_key_value_heads=0, sparse_mode=0, inner_precise=0, block_size=0,
                                    antiquant_mode=0, key_antiquant_mode=0, value_antiquant_mode=0,
                                    softmax_lse_flag=False):
    """FIA v1 (spec §7). key_rope_antiquant_scale is reserved (ignored); the antiquant modes only matter with
    antiquant scales (antiquant_mode with the combined antiquant_scale, key_/value_antiquant_mode with the separate
    ones, which win). Returns (attention_out, softmax_lse)."""
    op = "npu_fused_infer_attention_score"
    antiquant = _pick_antiquant(op, (antiquant_scale, antiquant_offset, antiquant_mode),
                                (key_antiquant_scale, key_antiquant_offset, value_antiquant_scale,
                                 value_antiquant_offset, key_antiquant_mode, value_antiquant_mode))
    out, lse = _infer(op, query, key, value, input_layout=input_layout, num_heads=num_heads,
                      num_key_value_heads=num_key_value_heads, scale=scale, pse_shift=pse_shift,
                      atten_mask=atten_mask, act_q=_int_list(actual_seq_lengths, op, "actual_seq_lengths"),
                      act_kv=_int_list(actual_seq_lengths_kv, op, "actual_seq_lengths_kv"),
                      block_table=block_table, block_size=block_size, query_padding_size=query_padding_size,
                      kv_padding_size=kv_padding_size, key_shared_prefix=key_shared_prefix,
                      value_shared_prefix=value_shared_prefix, actual_shared_prefix_len=actual_shared_prefix_len,
                      query_rope=query_rope, key_rope=key_rope, sparse_mode=sparse_mode, pre_tokens=pre_tokens,
                      next_tokens=next_tokens, inner_precise=inner_precise, want_lse=bool(softmax_lse_flag),
                      full_int8={"dequant_scale1": dequant_scale1, "quant_scale1": quant_scale1,
                                 "dequant_scale2": dequant_scale2},
                      antiquant=antiquant, quant_scale2=quant_scale2, quant_offset2=quant_offset2)
    return out, (lse if softmax_lse_flag else _empty_lse())


def npu_fused_infer_attention_score_v2(query, key, value, *, query_rope=None, key_rope=None, pse_shift=None,
                                       atten_mask=None, actual_seq_qlen=None, actual_seq_kvlen=None, block_table=None,
                                       dequant_scale_query=None, dequant_scale_key=None, dequant_offset_key=None,
                                       dequant_scale_value=None, dequant_offset_value=None, dequant_scale_key_rope=None,
                                       quant_scale_out=None, quant_offset_out=None, quant_scale_p=None,
                                       learnable_sink=None, num_query_heads=1, num_key_value_heads=0,
                                       softmax_scale=1.0, pre_tokens=2147483647, next_tokens=2147483647,
                                       input_layout="BSH", sparse_mode=0, block_size=0, query_quant_mode=0,
                                       key_quant_mode=0, value_quant_mode=0, inner_precise=0,
                                       return_softmax_lse=False, query_dtype=None, key_dtype=None, value_dtype=None,
                                       query_rope_dtype=None, key_rope_dtype=None, key_shared_prefix_dtype=None,
                                       value_shared_prefix_dtype=None, dequant_scale_query_dtype=None,
                                       dequant_scale_key_dtype=None, dequant_scale_value_dtype=None,
                                       dequant_scale_key_rope_dtype=None, out_dtype=None):
    """FIA v2 (spec §8): v1 without left padding / shared prefix, plus learnable_sink. quant_scale_p,
    dequant_scale_key_rope and the *_dtype arguments are reserved (ignored); out_dtype is ignored too (a quantised
    output is int8). KV antiquant: dequant_scale_/dequant_offset_key/value with key_/value_quant_mode. An int8
    query needs dequant_scale_query, which is not supported (decision 7). Returns (attention_out, softmax_lse)."""
    op = "npu_fused_infer_attention_score_v2"
    if dequant_scale_query is not None:
        _fail(op, "dequant_scale_query (int8 query) is not supported")
    if query.dtype == torch.int8:
        _fail(op, "an int8 query needs dequant_scale_query, which is not supported")
    antiquant = _pick_antiquant(op, None, (dequant_scale_key, dequant_offset_key, dequant_scale_value,
                                           dequant_offset_value, key_quant_mode, value_quant_mode))
    out, lse = _infer(op, query, key, value, input_layout=input_layout, num_heads=num_query_heads,
                      num_key_value_heads=num_key_value_heads, scale=softmax_scale, pse_shift=pse_shift,
                      atten_mask=atten_mask, act_q=_int_list(actual_seq_qlen, op, "actual_seq_qlen"),
                      act_kv=_int_list(actual_seq_kvlen, op, "actual_seq_kvlen"), block_table=block_table,
                      block_size=block_size, query_rope=query_rope, key_rope=key_rope, sparse_mode=sparse_mode,
                      pre_tokens=pre_tokens, next_tokens=next_tokens, inner_precise=inner_precise,
                      learnable_sink=learnable_sink, want_lse=bool(return_softmax_lse), antiquant=antiquant,
                      quant_scale2=quant_scale_out, quant_offset2=quant_offset_out,
                      quant_names=("quant_scale_out", "quant_offset_out"))
    return out, (lse if return_softmax_lse else _empty_lse())


# ---------------------------------------------------------------------------------------------------
# npu_trans_quant_param: fp32 scales (and offsets) -> the int64 ("uint64") words of the int8 pipelines.
# ---------------------------------------------------------------------------------------------------
def npu_trans_quant_param(scale, offset=None, round_mode=0):
    """Each word: the fp32 bits of the scale & 0xFFFFE000 (round_mode 1: rounded to those 19 bits first, i.e. +0x1000
    on the bit pattern, ties away from zero), bit 46 set, and with an offset clamp(round(offset), -256, 255) & 0x1FF
    (round half away from zero) in bits 37-45.  Shape: scale's, or scale and offset broadcast.  Returns int64."""
    op = "npu_trans_quant_param"
    if int(round_mode) not in (0, 1):
        _fail(op, f"round_mode {round_mode} is not 0 or 1")
    for t, name in ((scale, "scale"), (offset, "offset")):
        if t is not None and (not isinstance(t, torch.Tensor) or not t.is_floating_point()):
            _fail(op, f"{name} must be a float tensor")
    shape = tuple(scale.shape) if offset is None else tuple(torch.broadcast_shapes(scale.shape, offset.shape))
    scales = scale.to(torch.float32).expand(shape).reshape(-1).tolist()
    offsets = [None] * len(scales) if offset is None else offset.to(torch.float32).expand(shape).reshape(-1).tolist()
    words = []
    for s, o in zip(scales, offsets):
        bits = _f32_bits(s)
        if int(round_mode) == 1:
            bits = (bits + 0x1000) & 0xFFFFFFFF  # round half up the 13 dropped mantissa bits (on the magnitude)
        word = (bits & _FP19_MASK) | _TQP_FLAG
        if o is not None:
            o = _round_half_away(min(max(o, -256.0), 255.0))
            word |= (o & 0x1FF) << _TQP_OFFSET_SHIFT
        words.append(word)
    return torch.tensor(words, dtype=torch.int64).reshape(shape)


# ---------------------------------------------------------------------------------------------------
# Paged KV-cache write (vLLM's reshape_and_cache).
# ---------------------------------------------------------------------------------------------------
def _npu_reshape_and_cache(key, value, key_cache, value_cache, slot_indices):
    """key [T, Nkv, D], value [T, Nkv, Dv]; caches (blocknum, block_size, Nkv, D) or (blocknum, block_size, Nkv·D),
    any strides. Token t goes to slot s = slot_indices[t] = block·block_size + offset; s < 0 is skipped; rows are
    written in token order (a repeated slot keeps the last one). In place; returns None."""
    op = "_npu_reshape_and_cache"
    if key.dim() != 3 or value.dim() != 3 or key.shape[:2] != value.shape[:2]:
        _fail(op, f"key {tuple(key.shape)} / value {tuple(value.shape)} must be [T, Nkv, D] with equal T, Nkv")
    slots = _int_list(slot_indices, op, "slot_indices") if key.shape[0] else []
    if len(slots) != key.shape[0]:
        _fail(op, f"slot_indices has {len(slots)} entries, key has {key.shape[0]} tokens")
    for src, cache, name in ((key, key_cache, "key_cache"), (value, value_cache, "value_cache")):
        if cache.dtype != src.dtype:
            _fail(op, f"{name} dtype {cache.dtype} != {src.dtype}")
        per_slot = tuple(cache.shape[2:])
        if per_slot not in ((src.shape[1], src.shape[2]), (src.shape[1] * src.shape[2],)):
            _fail(op, f"{name} shape {tuple(cache.shape)} does not fit tokens of shape {tuple(src.shape[1:])}")
    if key_cache.shape[:2] != value_cache.shape[:2]:
        _fail(op, "key_cache and value_cache differ in (blocknum, block_size)")
    blocknum, block_size = key_cache.shape[0], key_cache.shape[1]
    for s in slots:
        if s >= blocknum * block_size:
            _fail(op, f"slot {s} is outside the cache ({blocknum} blocks of {block_size})")
    for t, s in enumerate(slots):
        if s < 0:
            continue
        blk, off = divmod(s, block_size)
        key_cache[blk, off] = key[t].reshape(key_cache[blk, off].shape)
        value_cache[blk, off] = value[t].reshape(value_cache[blk, off].shape)
    return None
