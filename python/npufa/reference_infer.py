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
  * attention_out has the query's dtype; softmax_lse is float32 ([0] when not requested).

Quantisation arguments (int8 pipelines, KV antiquant, output quant) raise NotImplementedError for now.
Invalid input raises ValueError with a short message; the checks are not exhaustive.
"""

import torch

__all__ = [
    "npu_prompt_flash_attention",
    "npu_incre_flash_attention",
    "npu_fused_infer_attention_score",
    "npu_fused_infer_attention_score_v2",
    "_npu_reshape_and_cache",
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


def _reject_quant(op, **args):
    for name, val in args.items():
        if val is not None:
            raise NotImplementedError(f"{op}: {name} (quantisation) is not yet supported by the reference")


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
# The math of one (batch, query head).
# ---------------------------------------------------------------------------------------------------
def _attend_head(q, k, v, scale, pse, masked, sink):
    """q [Sq, D], k [Skv, D], v [Skv, Dv] float64; pse [Sq, Skv] or None; masked bool [Sq, Skv] or None;
    sink: float or None.  Returns out [Sq, Dv], lse [Sq]."""
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
    return out, lse


# ---------------------------------------------------------------------------------------------------
# The common inference computation.
# ---------------------------------------------------------------------------------------------------
def _infer(op, query, key, value, *, input_layout, num_heads, num_key_value_heads, scale, pse_shift=None,
           atten_mask=None, act_q=None, act_kv=None, block_table=None, block_size=0, query_padding_size=None,
           kv_padding_size=None, key_shared_prefix=None, value_shared_prefix=None, actual_shared_prefix_len=None,
           query_rope=None, key_rope=None, sparse_mode=0, pre_tokens=2147483647, next_tokens=2147483647,
           inner_precise=None, learnable_sink=None, want_lse=False):
    """Returns (attention_out in the output layout with the query dtype, lse float32 or None)."""
    # ---- layout, heads ----
    if input_layout not in _OP_LAYOUTS[op]:
        _fail(op, f"input_layout {input_layout!r} is not one of {_OP_LAYOUTS[op]}")
    in_kind, out_kind = _LAYOUTS[input_layout]
    tnd = in_kind in ("TND", "NTD")
    if not query.is_floating_point():
        raise NotImplementedError(f"{op}: {query.dtype} query (full quantisation) is not yet supported by the "
                                  "reference")
    if not key.is_floating_point() or not value.is_floating_point():
        raise NotImplementedError(f"{op}: {key.dtype} key/value (antiquant) is not yet supported by the reference")
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
    for b in range(bsz):
        qs, qe = q_win[b]
        if qe == qs or kv_win[b] is None:
            continue  # no valid row, or (decode, left padding) no valid key: 0 / -FLT_MAX
        q_b = q[:, qs:qe] if tnd else q[b, :, qs:qe]  # [Nq, Sq_b, D]
        k_b, v_b = own_keys(k_all, b), own_keys(v_all, b)  # [Nkv, L, D]
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
            o, l = _attend_head(q_b[n], k_b[n // group], v_b[n // group], scale,
                                None if pse_b is None else pse_b[n], masked,
                                None if sink is None else float(sink[n]))
            if tnd:
                out[qs:qe, n] = o
                lse[qs:qe, n] = l
            else:
                out[b, n, qs:qe] = o
                lse[b, n, qs:qe] = l

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
    res = res.contiguous().to(query.dtype)
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
    _reject_quant(op, deq_scale1=deq_scale1, quant_scale1=quant_scale1, deq_scale2=deq_scale2,
                  quant_scale2=quant_scale2, quant_offset2=quant_offset2)
    out, _ = _infer(op, query, key, value, input_layout=input_layout, num_heads=num_heads,
                    num_key_value_heads=num_key_value_heads, scale=scale_value, pse_shift=pse_shift,
                    atten_mask=atten_mask, act_q=_int_list(actual_seq_lengths, op, "actual_seq_lengths"),
                    act_kv=_int_list(actual_seq_lengths_kv, op, "actual_seq_lengths_kv"),
                    sparse_mode=sparse_mode, pre_tokens=pre_tokens, next_tokens=next_tokens)
    return out


def npu_incre_flash_attention(query, key, value, *, padding_mask=None, atten_mask=None, pse_shift=None,
                              actual_seq_lengths=None, antiquant_scale=None, antiquant_offset=None, block_table=None,
                              dequant_scale1=None, quant_scale1=None, dequant_scale2=None, quant_scale2=None,
                              quant_offset2=None, kv_padding_size=None, num_heads=1, scale_value=1.0,
                              input_layout="BSH", num_key_value_heads=0, block_size=0, inner_precise=1):
    """IFA (spec §6): query S = 1; actual_seq_lengths are the per-batch KV lengths. Returns attention_out."""
    op = "npu_incre_flash_attention"
    _reject_quant(op, antiquant_scale=antiquant_scale, antiquant_offset=antiquant_offset,
                  dequant_scale1=dequant_scale1, quant_scale1=quant_scale1, dequant_scale2=dequant_scale2,
                  quant_scale2=quant_scale2, quant_offset2=quant_offset2)
    out, _ = _infer(op, query, key, value, input_layout=input_layout, num_heads=num_heads,
                    num_key_value_heads=num_key_value_heads, scale=scale_value, pse_shift=pse_shift,
                    atten_mask=atten_mask, act_kv=_int_list(actual_seq_lengths, op, "actual_seq_lengths"),
                    block_table=block_table, block_size=block_size, kv_padding_size=kv_padding_size,
                    inner_precise=inner_precise)
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
    antiquant scales. Returns (attention_out, softmax_lse)."""
    op = "npu_fused_infer_attention_score"
    _reject_quant(op, dequant_scale1=dequant_scale1, quant_scale1=quant_scale1, dequant_scale2=dequant_scale2,
                  quant_scale2=quant_scale2, quant_offset2=quant_offset2, antiquant_scale=antiquant_scale,
                  antiquant_offset=antiquant_offset, key_antiquant_scale=key_antiquant_scale,
                  key_antiquant_offset=key_antiquant_offset, value_antiquant_scale=value_antiquant_scale,
                  value_antiquant_offset=value_antiquant_offset)
    out, lse = _infer(op, query, key, value, input_layout=input_layout, num_heads=num_heads,
                      num_key_value_heads=num_key_value_heads, scale=scale, pse_shift=pse_shift,
                      atten_mask=atten_mask, act_q=_int_list(actual_seq_lengths, op, "actual_seq_lengths"),
                      act_kv=_int_list(actual_seq_lengths_kv, op, "actual_seq_lengths_kv"),
                      block_table=block_table, block_size=block_size, query_padding_size=query_padding_size,
                      kv_padding_size=kv_padding_size, key_shared_prefix=key_shared_prefix,
                      value_shared_prefix=value_shared_prefix, actual_shared_prefix_len=actual_shared_prefix_len,
                      query_rope=query_rope, key_rope=key_rope, sparse_mode=sparse_mode, pre_tokens=pre_tokens,
                      next_tokens=next_tokens, inner_precise=inner_precise, want_lse=bool(softmax_lse_flag))
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
    dequant_scale_key_rope and the *_dtype arguments are reserved (ignored); out_dtype only matters for
    quantised outputs. Returns (attention_out, softmax_lse)."""
    op = "npu_fused_infer_attention_score_v2"
    _reject_quant(op, dequant_scale_query=dequant_scale_query, dequant_scale_key=dequant_scale_key,
                  dequant_offset_key=dequant_offset_key, dequant_scale_value=dequant_scale_value,
                  dequant_offset_value=dequant_offset_value, quant_scale_out=quant_scale_out,
                  quant_offset_out=quant_offset_out)
    out, lse = _infer(op, query, key, value, input_layout=input_layout, num_heads=num_query_heads,
                      num_key_value_heads=num_key_value_heads, scale=softmax_scale, pse_shift=pse_shift,
                      atten_mask=atten_mask, act_q=_int_list(actual_seq_qlen, op, "actual_seq_qlen"),
                      act_kv=_int_list(actual_seq_kvlen, op, "actual_seq_kvlen"), block_table=block_table,
                      block_size=block_size, query_rope=query_rope, key_rope=key_rope, sparse_mode=sparse_mode,
                      pre_tokens=pre_tokens, next_tokens=next_tokens, inner_precise=inner_precise,
                      learnable_sink=learnable_sink, want_lse=bool(return_softmax_lse))
    return out, (lse if return_softmax_lse else _empty_lse())


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
