"""Pure-torch float64 reference of ``torch_npu.npu_fusion_attention`` (training forward).

Written directly from /work/shared/spec/torch_npu_attention.md (sections 1 and 2) and the project
decisions in /work/shared/spec/README.md.  It is deliberately simple: for every batch it materialises
the whole [Nq, Sq_b, Skv_b] score matrix in float64, applies pse / scale / mask / sink / dropout with
plain torch ops and writes the results back.  It is the oracle the fast implementation is tested
against, so clarity wins over speed, and it imports nothing from npufa.

Public API:
    npu_fusion_attention(...) -> (attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, numels)
    unpack_dropout_mask(mask_uint8, numels) -> bool tensor [numels]
"""

import torch

__all__ = ["npu_fusion_attention", "unpack_dropout_mask", "FLT_MAX"]

# Largest finite float32 (§1.7): fully-masked rows get softmax_max = -FLT_MAX, softmax_sum = +FLT_MAX.
FLT_MAX = 3.4028234663852886e38

_F64 = torch.float64
_LAYOUTS = ("BSH", "SBH", "BSND", "BNSD", "TND")


# ---------------------------------------------------------------------------------------------------
# Dropout mask (§2.4): bit k of byte t is element 8t+k (LSB first), 1 = keep.
# ---------------------------------------------------------------------------------------------------
def unpack_dropout_mask(mask_uint8, numels):
    """Unpack a bit-packed uint8 dropout mask into a bool tensor of ``numels`` elements (True = keep)."""
    flat = torch.as_tensor(mask_uint8).reshape(-1).to(torch.int64)
    assert flat.numel() * 8 >= numels, f"dropout_mask has {flat.numel()} bytes, needs {(numels + 7) // 8}"
    shifts = torch.arange(8, dtype=torch.int64)
    bits = (flat.unsqueeze(1) >> shifts) & 1  # [bytes, 8], column k = bit k
    return bits.reshape(-1)[:numels].to(torch.bool)


# ---------------------------------------------------------------------------------------------------
# Masking predicate (§1.6): per batch, local i in [0,Sq_b), j in [0,Skv_b).
# ---------------------------------------------------------------------------------------------------
def _in_band(i, j, pre, nxt):
    # inBand(i, j; P, X) := (j - i <= X) and (i - j <= P)   (left-up coordinates)
    return ((j - i) <= nxt) & ((i - j) <= pre)


def _structural_mask(mode, sq, skv, pre, nxt, prefix_b, is_last, is_first):
    """The part of the predicate that does not read the mask tensor. Returns bool [sq, skv] (True = masked),
    or None when the mode has no structural part (mode 1)."""
    i = torch.arange(sq, dtype=torch.int64).unsqueeze(1)
    j = torch.arange(skv, dtype=torch.int64).unsqueeze(0)
    d = skv - sq  # right-down anchoring offset
    if mode == 0:
        return ~_in_band(i, j, pre, nxt)
    if mode == 1:
        return None
    if mode == 2:  # left-up causal
        return j > i
    if mode == 3:  # right-down causal
        return j > i + d
    if mode == 4:  # band anchored right-down, converted to left-up (§1.6 note 2)
        return ~_in_band(i, j, pre + sq - skv, nxt + skv - sq)
    if mode in (5, 6):  # prefix: right-down causal except the first prefix[b] columns
        return (j > i + d) & (j >= prefix_b)
    if mode == 7:  # varlen split: right-down causal, last non-empty batch also banded by next
        return j > i + d + (nxt if is_last else 0)
    if mode == 8:  # varlen split: left-up causal, first non-empty batch banded
        if is_first:
            return (j - i) > skv - max(sq - nxt, 0)
        return j > i
    raise ValueError(f"sparse_mode {mode} is not supported by the reference")


def _batch_mask(mode, user_mask_b, sq, skv, pre, nxt, prefix_b, is_last, is_first):
    """Full predicate for one batch: bool [1 or Nq, sq, skv] (True = masked), or None (nothing masked).
    ``user_mask_b`` is the explicit mask already cut to this batch ([1 or Nq, sq, skv]) or None."""
    structural = _structural_mask(mode, sq, skv, pre, nxt, prefix_b, is_last, is_first)
    if mode in (0, 1, 5):  # modes that read the mask tensor elementwise
        assert user_mask_b is not None
        m = user_mask_b if structural is None else (user_mask_b | structural)
    else:  # compressed marker modes (2, 3, 4, 6, 7, 8): tensor content ignored (§1.6.1)
        m = structural
    return m.reshape((-1, sq, skv))


# ---------------------------------------------------------------------------------------------------
# Per-batch explicit mask / pse extraction.
# ---------------------------------------------------------------------------------------------------
def _user_mask_dense(atten_mask, b, sq, skv):
    """Non-TND explicit mask (§1.5): [B,N,Sq,Skv], [B,1,Sq,Skv], [1,N,Sq,Skv], [1,1,Sq,Skv] or [Sq,Skv]."""
    m = atten_mask
    if m.dim() == 2:
        m = m.unsqueeze(0)
    else:
        assert m.dim() == 4, f"atten_mask must be 2-D or 4-D, got {tuple(m.shape)}"
        m = m[b if m.shape[0] > 1 else 0]
    assert tuple(m.shape[-2:]) == (sq, skv), f"atten_mask shape {tuple(atten_mask.shape)} vs Sq={sq}, Skv={skv}"
    return m != 0


def _user_mask_tnd(atten_mask, sq, skv, max_sq, max_skv, q_off, kv_off):
    """TND explicit mask (§1.6.1): [maxSq, maxSkv] indexed locally (preferred when the shape matches),
    otherwise [sum Sq_b, sum Skv_b] / [Tq, Tkv] indexed with global (q_off + i, kv_off + j)."""
    m = atten_mask
    while m.dim() > 2:  # tolerate leading unit dims ([1,1,S,S])
        assert m.shape[0] == 1, f"TND atten_mask must be 2-D, got {tuple(atten_mask.shape)}"
        m = m[0]
    if tuple(m.shape) == (max_sq, max_skv):
        blk = m[:sq, :skv]
    else:
        blk = m[q_off:q_off + sq, kv_off:kv_off + skv]
    assert tuple(blk.shape) == (sq, skv), f"TND atten_mask shape {tuple(atten_mask.shape)} too small"
    return (blk != 0).unsqueeze(0)


def _pse_dense(pse, b, nq, sq, skv):
    """Non-TND pse (§2.5) for batch b as float64 broadcastable to [Nq, Sq, Skv]."""
    p = pse[b if pse.shape[0] > 1 else 0]  # [Nq, Sp, Skv]
    assert p.shape[0] == nq and p.shape[-1] == skv, f"pse shape {tuple(pse.shape)}"
    if p.shape[1] == 1024 and sq > 1024:
        # Alibi-compressed: C holds the last 1024 rows of a Toeplitz bias (§2.5).
        #   i >= R: C[i-R][j];  i < R: C[m][j+R+m-i], m = i % 1024.   Defined only for j <= i.
        r = sq - 1024
        i = torch.arange(sq).unsqueeze(1)
        j = torch.arange(skv).unsqueeze(0)
        m = i % 1024
        row = torch.where(i >= r, i - r, m).expand(sq, skv)
        col = torch.where(i >= r, j, j + r + m - i)
        valid = (j <= i) & (col >= 0) & (col < skv)
        col = col.clamp(0, skv - 1)
        full = p[:, row, col]  # [Nq, Sq, Skv]
        return torch.where(valid, full, torch.zeros((), dtype=_F64))
    assert p.shape[1] in (1, sq), f"pse shape {tuple(pse.shape)} vs Sq={sq}"
    return p


def _pse_tnd(pse, b, nq, sq_list, skv_list, max_sq):
    """TND pse for batch b as float64 broadcastable to [Nq, Sq_b, Skv_b] (brief: cases a-d)."""
    sq, skv = sq_list[b], skv_list[b]
    if pse.dim() == 4:
        p = pse[b if pse.shape[0] > 1 else 0]  # [Nq, Sp, S]
        assert p.shape[0] == nq, f"pse shape {tuple(pse.shape)}"
        if p.shape[1] == 1024 and max_sq > 1024:
            # (b) alibi-compressed, per batch: R' = S - 1024, d = i - j (defined for d >= 0):
            #     d >= R': C[d - R'][0];  else C[0][R' - d]
            rr = p.shape[2] - 1024
            i = torch.arange(sq).unsqueeze(1)
            j = torch.arange(skv).unsqueeze(0)
            d = i - j
            row = torch.where(d >= rr, d - rr, torch.zeros_like(d))
            col = torch.where(d >= rr, torch.zeros_like(d), rr - d)
            valid = (d >= 0) & (row < 1024) & (col < p.shape[2])
            full = p[:, row.clamp(0, 1023), col.clamp(0, p.shape[2] - 1)]
            return torch.where(valid, full, torch.zeros((), dtype=_F64))
        # (a) [.., Nq, maxSq, maxSkv] or [.., Nq, 1, maxSkv], indexed locally
        rows = p[:, :1, :skv] if p.shape[1] == 1 else p[:, :sq, :skv]
        assert rows.shape[1] in (1, sq) and rows.shape[2] == skv, f"pse shape {tuple(pse.shape)}"
        return rows
    flat = pse.reshape(-1)
    bnss = nq * sum(a * c for a, c in zip(sq_list, skv_list))
    bn1s = nq * sum(skv_list)
    if flat.numel() == bnss:  # (c) per-batch [Nq, Sq_b, Skv_b] blocks concatenated
        off = nq * sum(a * c for a, c in zip(sq_list[:b], skv_list[:b]))
        return flat[off:off + nq * sq * skv].reshape(nq, sq, skv)
    if flat.numel() == bn1s:  # (d) per-batch [Nq, Skv_b] blocks concatenated
        off = nq * sum(skv_list[:b])
        return flat[off:off + nq * skv].reshape(nq, 1, skv)
    raise ValueError(f"TND pse with shape {tuple(pse.shape)} matches no supported form")


# ---------------------------------------------------------------------------------------------------
# Core math for one batch (§1.4, §1.7, §1.10, §2.4).
# ---------------------------------------------------------------------------------------------------
def _attend(q, k, v, pse_b, masked, scale, sink, keep_b, keep_prob):
    """q [Nq,Sq,D], k [Nq,Skv,D], v [Nq,Skv,Dv] (KV already expanded to query heads), float64.
    pse_b broadcastable to [Nq,Sq,Skv] or None; masked bool broadcastable or None; keep_b bool [Nq,Sq,Skv] or None.
    Returns out [Nq,Sq,Dv], max [Nq,Sq], sum [Nq,Sq]."""
    nq, sq, _ = q.shape
    skv = k.shape[1]
    if skv == 0 or q.shape[2] == 0:  # empty KV or D = 0 (§1.8): everything 0
        z = torch.zeros((nq, sq), dtype=_F64)
        return torch.zeros((nq, sq, v.shape[2]), dtype=_F64), z, z.clone()

    s = q @ k.transpose(1, 2)  # [Nq, Sq, Skv]
    if pse_b is not None:
        s = s + pse_b  # pse_type 1: pse is added BEFORE scale (§1.4)
    s = s * scale
    if masked is None:
        masked = torch.zeros((1, sq, skv), dtype=torch.bool)
    masked = masked.expand(nq, sq, skv)

    valid_row = (~masked).any(dim=-1)  # [Nq, Sq]: at least one unmasked key
    m = s.masked_fill(masked, float("-inf")).amax(dim=-1)  # row max over unmasked scores
    m_safe = torch.where(valid_row, m, torch.zeros((), dtype=_F64))
    e = torch.exp(s - m_safe.unsqueeze(-1)).masked_fill(masked, 0.0)
    l = e.sum(dim=-1)
    if sink is not None:  # sink: denominator only, not scaled, not in the max (§1.10)
        l = l + torch.exp(sink.view(nq, 1) - m_safe)
    l_safe = torch.where(valid_row, l, torch.ones((), dtype=_F64))
    p = torch.where(valid_row.unsqueeze(-1), e / l_safe.unsqueeze(-1), torch.zeros((), dtype=_F64))
    if keep_b is not None:  # dropout after normalisation; stats exclude it (§2.4)
        p = p * keep_b.to(_F64) / keep_prob
    out = p @ v

    # fully-masked rows (README decision 4): out 0, max -FLT_MAX, sum +FLT_MAX
    out = out.masked_fill(~valid_row.unsqueeze(-1), 0.0)
    smax = torch.where(valid_row, m, torch.full((), -FLT_MAX, dtype=_F64))
    ssum = torch.where(valid_row, l, torch.full((), FLT_MAX, dtype=_F64))
    return out, smax, ssum


# ---------------------------------------------------------------------------------------------------
# The operator.
# ---------------------------------------------------------------------------------------------------
def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
                         scale=1., keep_prob=1., pre_tockens=2147483647, next_tockens=2147483647, inner_precise=0,
                         prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                         gen_mask_parallel=True, sync=False, softmax_layout="", sink=None,
                         dropout_mask=None, seed=0, offset=0):
    """Float64 reference of torch_npu.npu_fusion_attention (spec §2). All returned tensors are float64.
    Returns (attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, numels)."""
    layout = input_layout.upper()
    assert layout in _LAYOUTS, f"unknown input_layout {input_layout!r}"
    assert padding_mask is None, "padding_mask is not supported (spec §2.2)"
    assert softmax_layout in ("", "TND"), f"softmax_layout {softmax_layout!r}"
    q = query.to(_F64)
    k = key.to(_F64)
    v = value.to(_F64)
    pse = None if pse is None else pse.to(_F64)
    sink = None if sink is None else sink.to(_F64).reshape(-1)
    pre, nxt = int(pre_tockens), int(next_tockens)
    mode = int(sparse_mode)
    use_dropout = keep_prob < 1.0
    if use_dropout and dropout_mask is None:
        raise ValueError("reference: keep_prob < 1 requires an explicit dropout_mask")
    if mode == 9 or mode > 8 or mode < 0:
        raise ValueError(f"sparse_mode {mode} is not supported")

    if layout == "TND":
        return _tnd(q, k, v, head_num, pse, atten_mask, scale, keep_prob, pre, nxt, prefix,
                    actual_seq_qlen, actual_seq_kvlen, mode, softmax_layout, sink,
                    dropout_mask if use_dropout else None, seed, offset)
    if mode in (7, 8):
        raise ValueError("sparse_mode 7/8 are only defined for the TND layout")

    # ---- layout -> BNSD (§1.2) ----
    if layout in ("BSH", "SBH"):
        hq, hk, hv = q.shape[2], k.shape[2], v.shape[2]
        d = hq // head_num
        nkv = hk // d
        dv = hv // nkv
        if layout == "BSH":  # [B,S,H] -> [B,N,S,D]
            to_bnsd = lambda x, n, dd: x.reshape(x.shape[0], x.shape[1], n, dd).permute(0, 2, 1, 3)
        else:  # SBH: [S,B,H] -> [B,N,S,D]
            to_bnsd = lambda x, n, dd: x.reshape(x.shape[0], x.shape[1], n, dd).permute(1, 2, 0, 3)
        qb, kb, vb = to_bnsd(q, head_num, d), to_bnsd(k, nkv, d), to_bnsd(v, nkv, dv)
    elif layout == "BSND":
        qb, kb, vb = (x.permute(0, 2, 1, 3) for x in (q, k, v))
    else:  # BNSD
        qb, kb, vb = q, k, v
    bsz, nq, sq, _ = qb.shape
    nkv, skv, dv = kb.shape[1], kb.shape[2], vb.shape[3]
    assert nq == head_num, f"head_num {head_num} != query heads {nq}"
    assert nq % nkv == 0, f"Nq {nq} not a multiple of Nkv {nkv}"
    g = nq // nkv  # GQA: query head n reads kv head n // g (§1.3)

    numels = bsz * nq * sq * skv
    keep_all = unpack_dropout_mask(dropout_mask, numels).reshape(bsz, nq, sq, skv) if use_dropout else None

    out = torch.zeros((bsz, nq, sq, dv), dtype=_F64)
    smax = torch.zeros((bsz, nq, sq), dtype=_F64)
    ssum = torch.zeros((bsz, nq, sq), dtype=_F64)
    for b in range(bsz):
        masked = None
        if atten_mask is not None:  # no mask => nothing masked, whatever mode/pre/next say (§1.6 note 1)
            user = _user_mask_dense(atten_mask, b, sq, skv) if mode in (0, 1, 5) else None
            prefix_b = int(prefix[b]) if mode in (5, 6) else 0
            masked = _batch_mask(mode, user, sq, skv, pre, nxt, prefix_b, False, False)
        pse_b = _pse_dense(pse, b, nq, sq, skv) if pse is not None else None
        kk = kb[b].repeat_interleave(g, dim=0)
        vv = vb[b].repeat_interleave(g, dim=0)
        keep_b = keep_all[b] if keep_all is not None else None
        out[b], smax[b], ssum[b] = _attend(qb[b], kk, vv, pse_b, masked, scale, sink, keep_b, keep_prob)

    # ---- BNSD -> output layout (§1.2), stats [B,Nq,Sq,8] (§2.3) ----
    if layout == "BSH":
        attn = out.permute(0, 2, 1, 3).reshape(bsz, sq, nq * dv)
    elif layout == "SBH":
        attn = out.permute(2, 0, 1, 3).reshape(sq, bsz, nq * dv)
    elif layout == "BSND":
        attn = out.permute(0, 2, 1, 3).contiguous()
    else:
        attn = out
    smax8 = smax.unsqueeze(-1).expand(bsz, nq, sq, 8).contiguous()
    ssum8 = ssum.unsqueeze(-1).expand(bsz, nq, sq, 8).contiguous()
    return attn, smax8, ssum8, torch.empty(0, dtype=_F64), seed, offset, numels


def _tnd(q, k, v, head_num, pse, atten_mask, scale, keep_prob, pre, nxt, prefix, cum_q, cum_kv, mode,
         softmax_layout, sink, dropout_mask, seed, offset):
    """Varlen TND path (§2.6): q [Tq,Nq,D], k [Tkv,Nkv,D], v [Tkv,Nkv,Dv]; cumulative length lists."""
    assert cum_q is not None and cum_kv is not None and len(cum_q) == len(cum_kv) and len(cum_q) > 0
    cum_q = [int(x) for x in cum_q]
    cum_kv = [int(x) for x in cum_kv]
    bsz = len(cum_q)
    tq, nq, _ = q.shape
    nkv, dv = k.shape[1], v.shape[2]
    assert nq == head_num, f"head_num {head_num} != query heads {nq}"
    assert nq % nkv == 0, f"Nq {nq} not a multiple of Nkv {nkv}"
    g = nq // nkv

    # per-batch lengths: max(cum[b] - cum[b-1], 0), offset = cum[b-1] (cum[-1] = 0)
    prev_q = [0] + cum_q[:-1]
    prev_kv = [0] + cum_kv[:-1]
    sq_list = [max(c - p, 0) for c, p in zip(cum_q, prev_q)]
    skv_list = [max(c - p, 0) for c, p in zip(cum_kv, prev_kv)]
    max_sq, max_skv = max(sq_list), max(skv_list)
    nonempty = [b for b in range(bsz) if sq_list[b] > 0]
    first_b = nonempty[0] if nonempty else -1
    last_b = nonempty[-1] if nonempty else -1

    # numels on the raw cumulative lists (§2.4, including the trailing-zero quirk)
    numels = nq * (cum_q[0] * cum_kv[0]
                   + sum((cum_q[i] - cum_q[i - 1]) * (cum_kv[i] - cum_kv[i - 1]) for i in range(1, bsz)))
    keep_bits = None
    if dropout_mask is not None:
        need = nq * sum(a * c for a, c in zip(sq_list, skv_list))
        keep_bits = unpack_dropout_mask(dropout_mask, need)

    out = torch.zeros((tq, nq, dv), dtype=_F64)
    smax = torch.zeros((nq, tq), dtype=_F64)  # rows not covered by any batch stay 0 (decision 12)
    ssum = torch.zeros((nq, tq), dtype=_F64)
    drop_off = 0  # Nq * sum_{b'<b} Sq_b' * Skv_b'
    for b in range(bsz):
        sq, skv = sq_list[b], skv_list[b]
        qo, ko = prev_q[b], prev_kv[b]
        if sq == 0:
            drop_off += nq * sq * skv
            continue
        qq = q[qo:qo + sq].permute(1, 0, 2)  # [Nq, Sq_b, D]
        kk = k[ko:ko + skv].permute(1, 0, 2).repeat_interleave(g, dim=0)
        vv = v[ko:ko + skv].permute(1, 0, 2).repeat_interleave(g, dim=0)
        masked = None
        if atten_mask is not None and skv > 0:
            user = (_user_mask_tnd(atten_mask, sq, skv, max_sq, max_skv, qo, ko)
                    if mode in (0, 1, 5) else None)
            prefix_b = int(prefix[b]) if mode in (5, 6) else 0
            masked = _batch_mask(mode, user, sq, skv, pre, nxt, prefix_b, b == last_b, b == first_b)
        pse_b = _pse_tnd(pse, b, nq, sq_list, skv_list, max_sq) if (pse is not None and skv > 0) else None
        keep_b = None
        if keep_bits is not None:
            keep_b = keep_bits[drop_off:drop_off + nq * sq * skv].reshape(nq, sq, skv)
        o, mx, sm = _attend(qq, kk, vv, pse_b, masked, scale, sink, keep_b, keep_prob)
        out[qo:qo + sq] = o.permute(1, 0, 2)
        smax[:, qo:qo + sq] = mx
        ssum[:, qo:qo + sq] = sm
        drop_off += nq * sq * skv

    # stats [Tq, Nq, 8]: N-major data by default (reshape of an [Nq,Tq,8] buffer), t-major for "TND" (§2.3)
    smax8 = smax.unsqueeze(-1).expand(nq, tq, 8).contiguous()
    ssum8 = ssum.unsqueeze(-1).expand(nq, tq, 8).contiguous()
    if softmax_layout == "TND":
        smax8 = smax8.permute(1, 0, 2).contiguous()
        ssum8 = ssum8.permute(1, 0, 2).contiguous()
    else:
        smax8 = smax8.reshape(tq, nq, 8)
        ssum8 = ssum8.reshape(tq, nq, 8)
    return out, smax8, ssum8, torch.empty(0, dtype=_F64), seed, offset, numels


# ---------------------------------------------------------------------------------------------------
# npu_fusion_attention_v2 (§3), reduced to the v1 reference above:
#   rope: q·k + q_rope·k_rope == [q, q_rope]·[k, k_rope] (per head, concatenated along D);
#   pse_type 0 (qk·scale + pse) == v1 with pse/scale; pse_type 2/3: the generated alibi
#   −slope·f(|j − i + kv_start − q_start|) as an explicit pse of pse_type 0.
# ---------------------------------------------------------------------------------------------------
def _cat_rope(x, xr, layout, heads):
    """Concatenates the rope part per head along the head dim, in any layout."""
    if layout in ("BSH", "SBH"):
        a, b, _ = x.shape
        return torch.cat([x.reshape(a, b, heads, -1), xr.reshape(a, b, heads, -1)], -1).reshape(a, b, -1)
    return torch.cat([x, xr], -1)


def npu_fusion_attention_v2(query, key, value, head_num, input_layout, *, pse=None, padding_mask=None,
                            atten_mask=None, query_rope=None, key_rope=None, scale=1., keep_prob=1.,
                            pre_tokens=2147483647, next_tokens=2147483647, inner_precise=0, prefix=None,
                            actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True,
                            sync=False, pse_type=1, q_start_idx=None, kv_start_idx=None, softmax_layout="",
                            sink=None, dropout_mask=None, seed=0, offset=0):
    layout = input_layout.upper()
    q, k = query.to(_F64), key.to(_F64)
    if query_rope is not None:
        nq = head_num
        nkv = (key.shape[-1] // (query.shape[-1] // nq)) if layout in ("BSH", "SBH") else None
        q = _cat_rope(q, query_rope.to(_F64), layout, nq)
        k = _cat_rope(k, key_rope.to(_F64), layout, nkv)
    if pse is not None and pse_type in (2, 3):
        qs = int(q_start_idx[0]) if q_start_idx else 0
        ks = int(kv_start_idx[0]) if kv_start_idx else 0
        slopes = pse.to(_F64)
        if layout == "TND":
            cq, ck = list(actual_seq_qlen), list(actual_seq_kvlen)
            blocks, pq, pk = [], 0, 0
            for b in range(len(cq)):
                sq, skv = max(cq[b] - pq, 0), max(ck[b] - pk, 0)
                pq, pk = cq[b], ck[b]
                shift = ks - qs if not (atten_mask is not None and sparse_mode == 8 and b > 0) else 0
                i = torch.arange(sq, dtype=_F64)[:, None]
                j = torch.arange(skv, dtype=_F64)[None, :]
                dist = (j - i + shift).abs()
                dist = dist.sqrt() if pse_type == 3 else dist
                sl = slopes[b] if slopes.dim() == 2 else slopes
                blocks.append((-sl[:, None, None] * dist[None]).reshape(-1))
            pse, pse_type = torch.cat(blocks), 0
        else:
            _, stat = None, None
            sq = query.shape[{"BSH": 1, "SBH": 0, "BSND": 1, "BNSD": 2}[layout]]
            skv = key.shape[{"BSH": 1, "SBH": 0, "BSND": 1, "BNSD": 2}[layout]]
            i = torch.arange(sq, dtype=_F64)[:, None]
            j = torch.arange(skv, dtype=_F64)[None, :]
            dist = (j - i + ks - qs).abs()
            dist = dist.sqrt() if pse_type == 3 else dist
            sl = slopes if slopes.dim() == 2 else slopes[None]
            pse, pse_type = -sl[:, :, None, None] * dist[None, None], 0
    if pse is not None and pse_type == 0:
        pse = pse.to(_F64) / scale  # v1 adds pse before scale
    return npu_fusion_attention(q, k, value, head_num, input_layout, pse=pse, padding_mask=padding_mask,
                                atten_mask=atten_mask, scale=scale, keep_prob=keep_prob, pre_tockens=pre_tokens,
                                next_tockens=next_tokens, inner_precise=inner_precise, prefix=prefix,
                                actual_seq_qlen=actual_seq_qlen, actual_seq_kvlen=actual_seq_kvlen,
                                sparse_mode=sparse_mode, softmax_layout=softmax_layout, sink=sink,
                                dropout_mask=dropout_mask, seed=seed, offset=offset)
if __package__: from .reference_infer import *  # noqa: E701,F401,F403  (skipped when loaded as a bare file)
