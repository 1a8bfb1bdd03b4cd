"""Quantisation in the inference ops: int8 KV antiquant, the full-int8 prefill pipeline, int8 output quantisation,
npu_trans_quant_param, the combination rules, and the ops' torch wiring on quantised calls.

Contract: docs/inference.md, section "Quantisation"; spec /work/shared/spec/torch_npu_attention.md §10 (with §5.5,
§6.2/6.3, §7, §8.2/8.3); project decisions 7-9 (/work/shared/spec/README.md).

Oracles (no test compares the op with itself only):
  1. KV antiquant (every mode of every op, paged and contiguous, GQA, layouts, query S, offsets, fp16/bf16):
     a. the float64 reference (npufa.reference) on the same int8 call;
     b. npufa's own float path on the K/V dequantised by hand in fp32 (k = (k_i8 + offset)·scale, fp32, the
        index formula of each mode written out here), with the query in fp32;
     c. when the scales are powers of two and the offsets integers (the dequantised K/V are exact in the query
        dtype): npufa's float path in the query dtype, which then solves the same mathematical problem.
  2. Full int8 prefill vs the reference (tolerance, decision 8); the int64 (npu_trans_quant_param) form of a scale
     == the fp32 form of its FP19-truncated value, bit for bit.
  3. Output quantisation bit for bit: problems whose fp32 row o is known exactly (each row sees one key, so
     P = 1, l = 1 and o = v_j), quantised by an independent torch formulation of the documented formula and by
     the reference; crafted values hit ties, fp16-arithmetic effects and saturation.
  4. npu_trans_quant_param: literal bit patterns.
  5. Errors: ValueError / TypeError naming the op and the argument.
  6. torch.library.opcheck of quantised calls; thread-count independence of an int8 decode.

By default the antiquant grid runs a seeded sample in which every value of every factor appears; NPUFA_SLOW=1
runs the full product.
"""
import itertools
import math
import random
import re

import pytest
import torch

import npufa
from infer_helpers import (BF16, F16, F32, F64, FIA, FIA2, IFA, PFA, REF, TRIU2048, agree, check_out, cum, from_bnsd,
                           make_paged, pack, ref_call, rnd)

I8 = torch.int8
pfa = npufa.npu_prompt_flash_attention
ifa = npufa.npu_incre_flash_attention
fia = npufa.npu_fused_infer_attention_score
fia2 = npufa.npu_fused_infer_attention_score_v2
tqp = npufa.npu_trans_quant_param
OPS = {PFA: pfa, IFA: ifa, FIA: fia, FIA2: fia2}
SHORT = {PFA: "pfa", IFA: "ifa", FIA: "fia", FIA2: "fia2"}
FLAG46 = 1 << 46


def rint8(shape, seed, lo=-128, hi=128):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, tuple(shape), generator=g, dtype=I8)


def runif(shape, lo, hi, seed, dtype=F32):
    g = torch.Generator().manual_seed(seed)
    return (lo + (hi - lo) * torch.rand(tuple(shape), generator=g, dtype=F64)).to(dtype)


def rpow2(shape, seed, exps=(5, 6, 7), dtype=F32):
    """Random powers of two 2**-e (exact in every float dtype)."""
    g = torch.Generator().manual_seed(seed)
    e = torch.tensor(exps, dtype=F64)[torch.randint(0, len(exps), tuple(shape), generator=g)]
    return torch.pow(2.0, -e).to(dtype)


def rint_off(shape, seed, dtype=F32):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, tuple(shape), generator=g).to(dtype)


def first(x):
    return x[0] if isinstance(x, tuple) else x


# ================================================================================================
# 1. KV antiquant == dequantise, then float attention
# ================================================================================================
# form -> (api, kind, key mode, value mode); kind "comb" = IFA/FIA v1 antiquant_scale (index 0 key, 1 value)
AQ_FORMS = {
    "ifa_comb_ch": (IFA, "comb", 0, 0), "ifa_comb_t": (IFA, "comb", 0, 0),
    "fia_comb0_ch": (FIA, "comb", 0, 0), "fia_comb0_t": (FIA, "comb", 0, 0), "fia_comb1": (FIA, "comb", 1, 1),
}
for _api, _p in ((FIA, "fia"), (FIA2, "fia2")):
    AQ_FORMS.update({
        f"{_p}_k0v0_ch": (_api, "sep", 0, 0), f"{_p}_k0v0_t": (_api, "sep", 0, 0), f"{_p}_k1v1": (_api, "sep", 1, 1),
        f"{_p}_k2v2": (_api, "sep", 2, 2), f"{_p}_k3v3": (_api, "sep", 3, 3), f"{_p}_k4v4": (_api, "sep", 4, 4),
        f"{_p}_k5v5": (_api, "sep", 5, 5), f"{_p}_k0v1": (_api, "sep", 0, 1)})

AQ_FACTORS = dict(form=list(AQ_FORMS), paged=["none", "BnBsH", "BnNBsD"], gqa=[1, 4],
                  layout=["BSH", "BSND", "BNSD", "TND"], Sq=[1, 2, 20], offset=[False, True], dtype=[F16, BF16])

NAMES = {
    IFA: dict(heads="num_heads", scale="scale_value", qlen=None, kvlen="actual_seq_lengths"),
    FIA: dict(heads="num_heads", scale="scale", qlen="actual_seq_lengths", kvlen="actual_seq_lengths_kv",
              ks="key_antiquant_scale", ko="key_antiquant_offset", vs="value_antiquant_scale",
              vo="value_antiquant_offset", km="key_antiquant_mode", vm="value_antiquant_mode"),
    FIA2: dict(heads="num_query_heads", scale="softmax_scale", qlen="actual_seq_qlen", kvlen="actual_seq_kvlen",
               ks="dequant_scale_key", ko="dequant_offset_key", vs="dequant_scale_value", vo="dequant_offset_value",
               km="key_quant_mode", vm="value_quant_mode"),
    PFA: dict(heads="num_heads", scale="scale_value", qlen="actual_seq_lengths", kvlen="actual_seq_lengths_kv"),
}


def aq_valid(cfg):
    api = AQ_FORMS[cfg["form"]][0]
    km = AQ_FORMS[cfg["form"]][2]
    if api == IFA and (cfg["Sq"] != 1 or cfg["layout"] == "TND"):
        return False
    if cfg["layout"] == "TND" and cfg["paged"] == "none":
        return False
    if km in (4, 5) and cfg["paged"] == "none":
        return False
    return True


def aq_all_cases():
    keys = list(AQ_FACTORS)
    out = []
    for vals in itertools.product(*AQ_FACTORS.values()):
        cfg = dict(zip(keys, vals))
        if aq_valid(cfg):
            out.append(cfg)
    return out


def covering_sample(cases, factors, n, seed):
    """n cases of `cases` such that every value of every factor appears at least once."""
    rng = random.Random(seed)
    pool = cases[:]
    rng.shuffle(pool)
    chosen = []
    for f, vals in factors.items():
        for v in vals:
            if not any(c[f] == v for c in chosen):
                chosen.append(next(c for c in pool if c[f] == v))
    rest = [c for c in pool if c not in chosen]
    chosen += rest[:max(0, n - len(chosen))]
    return chosen


def case_id(cfg):
    d = {F16: "fp16", BF16: "bf16"}
    return "-".join(d.get(v, str(v)) for v in cfg.values())


def _mode_tensor(mode, which, *, ch_kind, rng, seed, exact, B, Nkv, d, kvs, pool, layout, sdtype):
    """The stored scale (which='scale') or offset tensor of one side (key or value) in separate-argument mode
    `mode`, random values.  ch_kind 'ch' / 't' chooses per channel / per tensor for mode 0."""
    def vals(shape, dtype):
        if which == "scale":
            return rpow2(shape, seed, dtype=dtype) if exact else runif(shape, 0.01, 0.03, seed, dtype)
        return rint_off(shape, seed, dtype) if exact else runif(shape, -3.0, 3.0, seed, dtype)

    if mode == 0 and ch_kind == "t":
        return vals(rng.choice([(1,), (1, 1)]), sdtype)
    if mode == 0:
        shape = rng.choice([(1, Nkv, 1, d), (1, Nkv, d), (Nkv, 1, d), (Nkv, d), (1, Nkv * d), (Nkv * d,)])
        return vals(shape, sdtype)
    if mode == 1:
        return vals(rng.choice([(1, B, kvs), (B, kvs)]), F32)
    if mode == 2:
        return vals((Nkv,), sdtype)
    if mode == 3:
        return vals((B, Nkv, kvs), F32)
    if mode == 4:
        return vals(pool, F32)
    assert mode == 5
    return vals((pool[0], Nkv, pool[1]), F32)


def _expand(t, mode, *, B, Nkv, S, d, table, bs):
    """A stored scale/offset -> its value at every canonical position [B, Nkv, S, d] (float64): the documented
    index of each mode (per channel [n, d], per tensor, per token [b, s], per head [n], per token+head [b, n, s],
    paged [blk, off] / [blk, n, off] of token s of batch b)."""
    x = t.to(F64)
    if mode == 0 and x.numel() == 1:
        return x.reshape(()).expand(B, Nkv, S, d)
    if mode == 0:
        return x.reshape(Nkv, d).view(1, Nkv, 1, d).expand(B, Nkv, S, d)
    if mode in (1, 3):  # positions beyond the scale's extent are never read (every batch's length fits)
        x = x.reshape(B, 1 if mode == 1 else Nkv, x.shape[-1])
        x = torch.nn.functional.pad(x, (0, max(0, S - x.shape[-1])))[:, :, :S]
        return x.unsqueeze(-1).expand(B, Nkv, S, d)
    if mode == 2:
        return x.view(1, Nkv, 1, 1).expand(B, Nkv, S, d)
    out = torch.zeros(B, Nkv, S, d, dtype=F64)
    for b in range(B):
        for s in range(min(S, table.shape[1] * bs)):
            blk, off = int(table[b, s // bs]), s % bs
            if not 0 <= blk < x.shape[0]:
                continue  # beyond the batch's blocks: never read
            out[b, :, s, :] = (x[blk, off] if mode == 4 else x[blk, :, off].view(Nkv, 1))
    return out


def build_antiquant(cfg, seed):
    """-> dict(api, int8 call (args, kw), fp32 float call, query-dtype float call or None, dtype)."""
    rng = random.Random(seed)
    api, kind, km, vm = AQ_FORMS[cfg["form"]]
    names = NAMES[api]
    dtype, layout, Sq, paged = cfg["dtype"], cfg["layout"], cfg["Sq"], cfg["paged"]
    tnd = layout == "TND"
    exact = rng.random() < 0.5
    B = rng.choice([2, 3])
    Nkv = rng.choice([1, 2])
    Nq = Nkv * cfg["gqa"]
    D = rng.choice([16, 40])
    D = cfg.get("D", D)  # the dot-product decode tests pick whole 32-element chunks
    Skv = rng.choice([17, 70])
    Skv = cfg.get("Skv", Skv)
    bs = rng.choice([4, 16, 32])
    lens = [rng.randint(1, Skv) for _ in range(B)]
    lens[rng.randrange(B)] = Skv
    if rng.random() < 0.4:
        lens[rng.randrange(B)] = 0  # a batch without keys: output 0
    sdtype = rng.choice([dtype, F32])

    qb = rnd((B, Nq, Sq, D), dtype, seed)
    lq = [rng.randint(0, Sq) for _ in range(B)]  # query lengths (TND; half the non-TND prefills)
    lq[rng.randrange(B)] = Sq
    q_tail = rng.choice([0, 2])  # TND: rows beyond the last cumulative length (outside every window: 0)
    use_qlens = Sq > 1 and api != IFA and rng.random() < 0.5
    k8 = rint8((B, Nkv, Skv, D), seed + 1)
    v8 = rint8((B, Nkv, Skv, D), seed + 2)

    # ---- KV storage: contiguous or paged, same table for the int8 and the float problems ----
    table = None
    if paged != "none":
        extra_cols = rng.choice([0, 1])
        (kp8, vp8), table = make_paged([k8, v8], lens, bs, paged, seed + 3, extra_cols=extra_cols)
        nblocks = kp8.shape[0]
        pool = (nblocks, bs)
        kvs = rng.choice([max(lens), table.shape[1] * bs + 2])  # per-token scales: at least the positions read
    else:
        pool = None
        kvs = rng.choice([max(lens), Skv + 3])
    # ---- the scales / offsets and their canonical expansion ----
    kw_aq = {}
    exp = {}
    ch_kind = "t" if cfg["form"].endswith("_t") else ("t" if rng.random() < 0.3 and km == 0 and vm == 1 else "ch")
    if kind == "comb":
        mode = km
        parts = {}
        if mode == 1:
            shape, sd = (2, B, kvs), F32
        elif ch_kind == "t":
            shape, sd = rng.choice([(2,), (2, 1)]), sdtype
        else:
            shape = {"BNSD": (2, Nkv, 1, D), "BSND": (2, Nkv, D), "BSH": (2, Nkv * D), "TND": (2, Nkv, D)}[layout]
            sd = sdtype
        for which, base in (("scale", seed + 10), ("offset", seed + 20)):
            if which == "offset" and not cfg["offset"]:
                continue
            if which == "scale":
                t = rpow2(shape, base, dtype=sd) if exact else runif(shape, 0.01, 0.03, base, sd)
            else:
                t = rint_off(shape, base, sd) if exact else runif(shape, -3.0, 3.0, base, sd)
            parts[which] = t
            kw_aq["antiquant_" + which] = t
        if api == FIA:
            kw_aq["antiquant_mode"] = mode
        for i, side in enumerate(("k", "v")):
            exp[side] = tuple(None if parts.get(w) is None else
                              _expand(parts[w][i], mode, B=B, Nkv=Nkv, S=Skv, d=D, table=table, bs=bs)
                              for w in ("scale", "offset"))
    else:
        for side, mode, base in (("k", km, seed + 10), ("v", vm, seed + 30)):
            sc = _mode_tensor(mode, "scale", ch_kind=ch_kind, rng=random.Random(base), seed=base, exact=exact, B=B,
                              Nkv=Nkv, d=D, kvs=kvs, pool=pool, layout=layout, sdtype=sdtype)
            off = None
            if cfg["offset"]:
                off = _mode_tensor(mode, "offset", ch_kind=ch_kind, rng=random.Random(base), seed=base + 1,
                                   exact=exact, B=B, Nkv=Nkv, d=D, kvs=kvs, pool=pool, layout=layout, sdtype=sdtype)
                kw_aq[names[side + "o"]] = off
            kw_aq[names[side + "s"]] = sc
            exp[side] = tuple(None if t is None else _expand(t, mode, B=B, Nkv=Nkv, S=Skv, d=D, table=table, bs=bs)
                              for t in (sc, off))
        kw_aq[names["km"]] = km
        kw_aq[names["vm"]] = vm

    def deq(x8, side, dt):  # fp32 arithmetic, as the contract states: (k_i8 + offset) · scale
        sc, off = exp[side]
        x = x8.to(F32)
        if off is not None:
            x = x + off.to(F32)
        return (x * sc.to(F32)).to(dt)

    # ---- the three calls ----
    def make(kf, vf, qdt):
        """(args, kw) of the call on canonical key/value kf, vf [B, Nkv, Skv, D] (int8 or float)."""
        kw = {names["heads"]: Nq, names["scale"]: 1 / math.sqrt(D), "input_layout": layout}
        if Nkv != Nq or cfg["gqa"] == 1 and seed % 2:
            kw["num_key_value_heads"] = Nkv
        qx = qb.to(qdt)
        if tnd:
            q = pack(qx, lq, sum(lq) + q_tail)
            kw[names["qlen"]] = cum(lq)
        else:
            q = from_bnsd(qx, layout)
            if use_qlens:
                kw[names["qlen"]] = lq
        if paged != "none":
            (k, v), tb = make_paged([kf, vf], lens, bs, paged, seed + 3, extra_cols=extra_cols)
            assert torch.equal(tb, table)
            kw.update(block_table=table, block_size=bs)
            kw[names["kvlen"]] = lens
        else:
            k, v = from_bnsd(kf, layout), from_bnsd(vf, layout)
            if any(L != Skv for L in lens) or seed % 3 == 0:
                kw[names["kvlen"]] = lens
        return (q, k, v), kw

    args8, kw8 = make(k8, v8, dtype)
    kw8.update(kw_aq)
    args32, kw32 = make(deq(k8, "k", F32), deq(v8, "v", F32), F32)
    argsq = kwq = None
    if exact:
        kq, vq = deq(k8, "k", dtype), deq(v8, "v", dtype)
        assert torch.equal(kq.to(F32), deq(k8, "k", F32)) and torch.equal(vq.to(F32), deq(v8, "v", F32))
        argsq, kwq = make(kq, vq, dtype)
    return dict(api=api, int8=(args8, kw8), f32=(args32, kw32), qdt=(argsq, kwq), dtype=dtype, exact=exact)


def run_antiquant(cfg, seed):
    c = build_antiquant(cfg, seed)
    api, dtype = c["api"], c["dtype"]
    fn = OPS[api]
    args, kw = c["int8"]
    out = first(fn(*args, **kw))
    assert out.dtype == dtype
    # a. the float64 reference on the same int8 call
    r = first(ref_call(api, args, kw))
    check_out(out, r, dtype)
    # b. npufa's fp32 path on the K/V dequantised by hand
    o32 = first(fn(*c["f32"][0], **c["f32"][1]))
    check_out(out, o32.to(F64), dtype)
    # c. exact dequantisation: the same problem in the query dtype
    if c["exact"]:
        oq = first(fn(*c["qdt"][0], **c["qdt"][1]))
        agree(out, oq, ulps=2.0)


AQ_ALL = aq_all_cases()
AQ_SAMPLE = covering_sample(AQ_ALL, AQ_FACTORS, 90, 2024)


@pytest.mark.parametrize("cfg", AQ_SAMPLE, ids=[case_id(c) for c in AQ_SAMPLE])
def test_antiquant_grid(cfg):
    run_antiquant(cfg, 1000 + AQ_ALL.index(cfg))


@pytest.mark.slow
@pytest.mark.parametrize("cfg", AQ_ALL, ids=[case_id(c) for c in AQ_ALL])
def test_antiquant_grid_full(cfg):
    run_antiquant(cfg, 1000 + AQ_ALL.index(cfg))


def _antiquant_negative_control(kind):
    """The oracles above are sharp enough to see a wrong scale index: an op given a different (wrong) reading of
    the scales disagrees with them."""
    cfg = dict(form="fia_k4v4" if kind == "paged_logical" else "fia_k0v0_ch", paged="BnBsH", gqa=1, layout="BSND",
               Sq=1, offset=False, dtype=F16)
    seed = 77
    c = build_antiquant(cfg, seed)
    args, kw = c["int8"]
    kw = dict(kw)
    if kind == "paged_logical":
        # per-token scales of mode 4 read by logical position (b, s) instead of the token's block and offset
        lens, table, bs = kw["actual_seq_lengths_kv"], kw["block_table"], kw["block_size"]
        for name in ("key_antiquant_scale", "value_antiquant_scale"):
            pool = kw[name].clone()
            wrong = pool.clone()
            for b, L in enumerate(lens):
                for s in range(L):
                    blk = int(table[b, s // bs])
                    wrong[blk, s % bs] = pool.reshape(-1)[(b * 7 + s) % pool.numel()]
            kw[name] = wrong
    else:  # per-channel scale transposed: [d, n] instead of [n, d]
        for name in ("key_antiquant_scale", "value_antiquant_scale"):
            sc = kw[name]
            kw[name] = sc.reshape(-1).flip(0).reshape(sc.shape).contiguous()
    out = first(fia(*args, **kw))
    r = first(ref_call(FIA, *c["int8"]))
    with pytest.raises(AssertionError):
        check_out(out, r, F16)


@pytest.mark.parametrize("kind", ["paged_logical", "channel_flipped"])
def test_antiquant_checks_detect_wrong_scale_index(kind):
    _antiquant_negative_control(kind)


@pytest.mark.parametrize("api", [IFA, FIA, FIA2])
def test_antiquant_scale_dtypes_read_as_fp32(api):
    """Scales/offsets in fp16 / bf16 / fp32 holding the same values give the same result (docs: read as fp32)."""
    B, Nq, Nkv, S, D = 2, 4, 2, 33, 16
    q = rnd((B, Nq, 1, D), F16, 5)
    k8, v8 = rint8((B, Nkv, S, D), 6), rint8((B, Nkv, S, D), 7)
    sc = runif((2, Nkv, 1, D), 0.01, 0.03, 8, BF16)  # bf16 values: exact in fp16 and fp32 too
    off = rint_off((2, Nkv, 1, D), 9, BF16)
    outs = []
    for dt in (F32, F16, BF16):
        s, o = sc.to(dt), off.to(dt)
        if api == IFA:
            kw = dict(num_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD", antiquant_scale=s,
                      antiquant_offset=o)
        else:
            n = NAMES[api]
            kw = {n["heads"]: Nq, "num_key_value_heads": Nkv, "input_layout": "BNSD", n["ks"]: s[0], n["ko"]: o[0],
                  n["vs"]: s[1], n["vo"]: o[1]}
        outs.append(first(OPS[api](q, k8, v8, **kw)))
    agree(outs[0], outs[1], exact=True)
    agree(outs[0], outs[2], exact=True)


def test_separate_antiquant_wins_over_combined():
    B, Nq, Nkv, S, D = 2, 2, 2, 20, 16
    q = rnd((B, Nq, 3, D), F16, 11)
    k8, v8 = rint8((B, Nkv, S, D), 12), rint8((B, Nkv, S, D), 13)
    sep = dict(key_antiquant_scale=runif((Nkv, D), 0.01, 0.03, 14, F16),
               value_antiquant_scale=runif((Nkv, D), 0.01, 0.03, 15, F16))
    kw = dict(num_heads=Nq, input_layout="BNSD")
    a = fia(q, k8, v8, **kw, **sep)[0]
    b = fia(q, k8, v8, **kw, **sep, antiquant_scale=runif((2, Nkv, 1, D), 0.5, 1.0, 16, F16), antiquant_mode=0)[0]
    agree(a, b, exact=True)
    c = fia(q, k8, v8, **kw, antiquant_scale=torch.stack([sep["key_antiquant_scale"],
                                                          sep["value_antiquant_scale"]]).view(2, Nkv, 1, D))[0]
    agree(a, c, ulps=2.0)


@pytest.mark.parametrize("mode", [1, 3])
def test_per_token_scale_uses_left_padded_position(mode):
    """Per-token scales are indexed by the token's position in the KV tensor (left padding: absolute)."""
    B, Nq, Nkv, S, D = 2, 2, 1, 24, 16
    lens, pad = [10, 17], 3
    q = rnd((B, Nq, 1, D), F16, 21)
    k8, v8 = rint8((B, Nkv, S, D), 22), rint8((B, Nkv, S, D), 23)
    shape = (B, S) if mode == 1 else (B, Nkv, S)
    ks, vs = runif(shape, 0.01, 0.03, 24), runif(shape, 0.01, 0.03, 25)
    kw = dict(num_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD", actual_seq_lengths_kv=lens,
              kv_padding_size=torch.tensor([pad]), key_antiquant_scale=ks, value_antiquant_scale=vs,
              key_antiquant_mode=mode, value_antiquant_mode=mode)
    out = fia(q, k8, v8, **kw)[0]
    sc_k = ks.reshape(B, 1, S, 1).to(F32) if mode == 1 else ks.reshape(B, Nkv, S, 1)
    sc_v = vs.reshape(B, 1, S, 1).to(F32) if mode == 1 else vs.reshape(B, Nkv, S, 1)
    kf, vf = k8.float() * sc_k, v8.float() * sc_v
    kw32 = {k: v for k, v in kw.items() if "antiquant" not in k}
    check_out(out, fia(q.float(), kf, vf, **kw32)[0].to(F64), F16)
    check_out(out, ref_call(FIA, (q, k8, v8), kw)[0], F16)


@pytest.mark.parametrize("Sq", [1, 5])
@pytest.mark.parametrize("api", [FIA, FIA2])
def test_antiquant_unread_scales_are_not_read(api, Sq):
    """Per-token scales beyond a batch's length (mode 1/3) and paged scales of slots holding no token (mode 4/5)
    may hold NaN: they are never read."""
    B, Nq, Nkv, S, D = 2, 4, 2, 40, 16
    lens = [40, 13]
    q = rnd((B, Nq, Sq, D), F16, 61)
    k8, v8 = rint8((B, Nkv, S, D), 62), rint8((B, Nkv, S, D), 63)
    n = NAMES[api]
    # contiguous, per token + head (mode 3)
    ks, vs = runif((B, Nkv, S), 0.01, 0.03, 64), runif((B, Nkv, S), 0.01, 0.03, 65)
    ksn, vsn = ks.clone(), vs.clone()
    ksn[1, :, 13:] = vsn[1, :, 13:] = float("nan")
    kw = {n["heads"]: Nq, "num_key_value_heads": Nkv, "input_layout": "BNSD", n["kvlen"]: lens, n["km"]: 3,
          n["vm"]: 3}
    a = first(OPS[api](q, k8, v8, **kw, **{n["ks"]: ks, n["vs"]: vs}))
    b = first(OPS[api](q, k8, v8, **kw, **{n["ks"]: ksn, n["vs"]: vsn}))
    agree(a, b, exact=True)
    # paged, per token (mode 4): NaN in every slot that holds no token
    (kp, vp), table = make_paged([k8, v8], lens, 8, "BnBsH", seed=66)
    nb = kp.shape[0]
    used = torch.zeros(nb, 8, dtype=torch.bool)
    for b_, L in enumerate(lens):
        for s_ in range(L):
            used[table[b_, s_ // 8], s_ % 8] = True
    ps = runif((nb, 8), 0.01, 0.03, 67)
    psn = ps.masked_fill(~used, float("nan"))
    kw = {n["heads"]: Nq, "num_key_value_heads": Nkv, "input_layout": "BNSD", n["kvlen"]: lens, n["km"]: 4,
          n["vm"]: 4, "block_table": table, "block_size": 8}
    a = first(OPS[api](q, kp, vp, **kw, **{n["ks"]: ps, n["vs"]: ps}))
    b = first(OPS[api](q, kp, vp, **kw, **{n["ks"]: psn, n["vs"]: psn}))
    agree(a, b, exact=True)
    check_out(b, first(ref_call(api, (q, kp, vp), dict(kw, **{n["ks"]: ps, n["vs"]: ps}))), F16)


# ================================================================================================
# 2. Full-int8 prefill (int8 query, key, value)
# ================================================================================================
def _full_int8_problem(api, layout, Sq, seed, partial=False):
    """An int8 q/k/v problem; partial=True adds rows outside every valid query window (query lengths < S, or a
    packed query longer than its last cumulative length)."""
    rng = random.Random(seed)
    B, Nkv = 2, 2
    Nq = Nkv * rng.choice([1, 2])
    D = rng.choice([16, 32])
    Skv = rng.choice([37, 70])
    qb, kb, vb = rint8((B, Nq, Sq, D), seed), rint8((B, Nkv, Skv, D), seed + 1), rint8((B, Nkv, Skv, D), seed + 2)
    names = NAMES[api]
    kw = {names["heads"]: Nq, "num_key_value_heads": Nkv, names["scale"]: 1 / math.sqrt(D), "input_layout": layout}
    tnd = layout == "TND"
    if tnd:
        lq, lkv = [Sq, max(1, Sq // 2)], [Skv, rng.randint(0, Skv - 1)]
        q, k, v = pack(qb, lq, sum(lq) + (2 if partial else 0)), pack(kb, lkv), pack(vb, lkv)
        kw[names["qlen"]], kw[names["kvlen"]] = cum(lq), cum(lkv)
    else:
        qk = {"BNSD_BSND": "BNSD", "BSH_NBSD": "BSH"}.get(layout, layout)
        q, k, v = from_bnsd(qb, qk), from_bnsd(kb, qk), from_bnsd(vb, qk)
        kw[names["kvlen"]] = [Skv, rng.randint(0, Skv - 1)]
        if Sq > 1 and partial:
            kw[names["qlen"]] = [Sq, rng.randint(0, Sq - 1)]
    mask = rng.choice(["none", "causal", "m1"]) if Sq > 1 or tnd else "none"
    if mask == "causal":
        kw.update(atten_mask=TRIU2048, sparse_mode=rng.choice([2, 3]))
    elif mask == "m1":
        kw.update(atten_mask=torch.rand(B, 1, Sq, Skv, generator=torch.Generator().manual_seed(seed + 3)) < 0.3,
                  sparse_mode=1)
    return (q, k, v), kw


def _exact_full_int8(api, args, kw, deq1, qs1, deq2):
    """The exact answer of the full-int8 pipeline: the float64 reference on the float problem with the scales
    folded in (s = (q·k)·deq1·scale, v' = v·qs1·deq2)."""
    names = NAMES[api]
    q, k, v = (x.to(F64) for x in args)
    kwf = {n: x for n, x in kw.items() if n not in ("deq_scale1", "quant_scale1", "deq_scale2", "dequant_scale1",
                                                    "dequant_scale2", "quant_scale2", "quant_offset2")}
    kwf[names["scale"]] = kw[names["scale"]] * deq1
    return first(REF.__dict__[api](q, k, v * (qs1 * deq2), **kwf))


def _ulp16(x):
    """fp16 spacing at |x| (subnormal spacing below 2**-14)."""
    _, e = torch.frexp(x.to(F64).abs())
    return torch.ldexp(torch.ones_like(x, dtype=F64), torch.clamp(e - 1, min=-14) - 10)


def _deq_names(api):
    return ("deq_scale1", "quant_scale1", "deq_scale2") if api == PFA else ("dequant_scale1", "quant_scale1",
                                                                            "dequant_scale2")


FULL_CASES = ([(PFA, lay, 9) for lay in ("BSH", "BSND", "BNSD", "BNSD_BSND", "TND")] + [(PFA, "BNSD", 1)] +
              [(FIA, lay, 9) for lay in ("BSH", "BSND", "BNSD", "BNSD_BSND", "BSH_NBSD", "TND")] +
              [(FIA, "BSND", 1)])


@pytest.mark.parametrize("scale_form", ["fp32", "int64"])
@pytest.mark.parametrize("out_kind", ["fp16", "int8", "int8_offset", "int8_channel"])
@pytest.mark.parametrize("api,layout,Sq", FULL_CASES, ids=[f"{SHORT[a]}-{b}-{c}" for a, b, c in FULL_CASES])
def test_full_int8_vs_reference(api, layout, Sq, out_kind, scale_form):
    seed = 300 + FULL_CASES.index((api, layout, Sq)) * 10
    args, kw = _full_int8_problem(api, layout, Sq, seed)
    D = args[0].shape[-1] if layout not in ("BSH", "BSH_NBSD") else args[0].shape[-1] // kw["num_heads"]
    Nq = kw["num_heads"]
    # realistic scales: q, k, v quantised with 0.02, P to int8 with 127
    sq_, sk_, sv_ = 0.021, 0.019, 0.023
    deq1, qs1, deq2 = sq_ * sk_, 127.0, sv_ / 127.0
    n1, nq1, n2 = _deq_names(api)
    if scale_form == "fp32":
        kw[n1], kw[nq1], kw[n2] = (torch.tensor([x], dtype=F32) for x in (deq1, qs1, deq2))
        used = [float(torch.tensor(x, dtype=F32)) for x in (deq1, qs1, deq2)]
    else:
        w1, w2 = tqp(torch.tensor([deq1])), tqp(torch.tensor([deq2]))
        kw[n1], kw[nq1], kw[n2] = w1, torch.tensor([qs1], dtype=F32), w2
        trunc = [_f32_from_bits(int(w) & 0xFFFFE000) for w in (w1, w2)]
        used = [trunc[0], float(torch.tensor(qs1, dtype=F32)), trunc[1]]
    if out_kind == "int8":
        kw["quant_scale2"] = torch.tensor([3.0])
    elif out_kind == "int8_offset":
        kw.update(quant_scale2=torch.tensor([2.5]), quant_offset2=torch.tensor([-1.5]))
    elif out_kind == "int8_channel":
        kw.update(quant_scale2=runif((Nq * D,), 1.0, 4.0, seed + 5), quant_offset2=runif((1, Nq, D), -2, 2, seed + 6))
    fn = OPS[api]
    out = first(fn(*args, **kw))
    r = first(ref_call(api, args, kw))
    exact = _exact_full_int8(api, args, kw, *used)
    assert tuple(out.shape) == tuple(r.shape) == tuple(exact.shape)
    if out_kind == "fp16":
        assert out.dtype == F16 and r.dtype == F16
        check_out(out, exact, F16)  # within 3 x the rounding of the exact result
        diff = (out.to(F64) - r.to(F64)).abs()
        assert (diff <= _ulp16(r)).all(), "more than 1 fp16 ulp from the reference"
    else:
        assert out.dtype == I8 and r.dtype == I8
        d = (out.to(torch.int32) - r.to(torch.int32)).abs()
        assert d.max() <= 1 and d.count_nonzero() <= max(1, out.numel() // 100), (d.max(), d.count_nonzero())
        zero_rows = (exact == 0).all(-1)
        assert (out[zero_rows] == 0).all(), "rows without a key must be int8 0"
    if scale_form == "int64":
        # the int64 word == the fp32 scale it encodes (bits & 0xFFFFE000), bit for bit
        kw32 = dict(kw)
        kw32[n1], kw32[n2] = torch.tensor([used[0]], dtype=F32), torch.tensor([used[2]], dtype=F32)
        agree(out, first(fn(*args, **kw32)), exact=True)


def _f32_from_bits(u):
    return torch.tensor([u & 0xFFFFFFFF], dtype=torch.int64).to(torch.int32).view(F32).item() if u < 2 ** 31 else \
        torch.tensor([u - 2 ** 32], dtype=torch.int32).view(F32).item()


@pytest.mark.parametrize("feature", ["shared_prefix", "kv_padding", "pse_shift", "gqa_bsh_mask"])
def test_full_int8_with_other_features(feature):
    """FIA v1 full int8 combined with a shared prefix (int8), KV left padding, pse_shift (fp16), GQA + BSH + mask."""
    B, Nq, Nkv, Sq, S, D = 2, 4, 2, 6, 20, 16
    q8, k8, v8 = rint8((B, Nq, Sq, D), 71), rint8((B, Nkv, S, D), 72), rint8((B, Nkv, S, D), 73)
    kw = dict(num_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD", scale=0.25, **DEQ_F)
    if feature == "shared_prefix":
        kw.update(key_shared_prefix=rint8((1, Nkv, 7, D), 74), value_shared_prefix=rint8((1, Nkv, 7, D), 75),
                  actual_shared_prefix_len=[5], actual_seq_lengths_kv=[20, 9])
    elif feature == "kv_padding":
        kw.update(kv_padding_size=torch.tensor([2]), actual_seq_lengths_kv=[15, 9])
    elif feature == "pse_shift":
        kw.update(pse_shift=rnd((1, Nq, Sq, S), F16, 76))
    else:
        q8, k8, v8 = from_bnsd(q8, "BSH"), from_bnsd(k8, "BSH"), from_bnsd(v8, "BSH")
        kw.update(input_layout="BSH", atten_mask=torch.rand(Sq, S, generator=torch.Generator().manual_seed(77)) < 0.4,
                  sparse_mode=1)
    out, _ = fia(q8, k8, v8, **kw)
    r = ref_call(FIA, (q8, k8, v8), kw)[0]
    assert out.dtype == F16 and tuple(out.shape) == tuple(r.shape)
    assert ((out.to(F64) - r.to(F64)).abs() <= _ulp16(r)).all()
    assert not torch.equal(out, torch.zeros_like(out))


def test_full_int8_equals_float_pipeline_with_folded_scales():
    """Metamorphic: the full-int8 pipeline == npufa's fp32 path on the int8 values with deq1 folded into the scale
    and qs1·deq2 into V (decision 8: probabilities stay fp32), up to fp16 rounding."""
    args, kw = _full_int8_problem(PFA, "BNSD", 12, 401)
    deq1, qs1, deq2 = 2.0 ** -12, 128.0, 2.0 ** -10  # powers of two: folding is exact
    kw.update(deq_scale1=torch.tensor([deq1]), quant_scale1=torch.tensor([qs1]), deq_scale2=torch.tensor([deq2]))
    out = pfa(*args, **kw)
    q, k, v = (x.float() for x in args)
    kwf = {n: x for n, x in kw.items() if n not in ("deq_scale1", "quant_scale1", "deq_scale2")}
    kwf["scale_value"] = kw["scale_value"] * deq1
    o32 = pfa(q, k, v * (qs1 * deq2), **kwf)
    check_out(out, o32.to(F64), F16)
    assert (out.to(F64) - o32.to(F64)).abs().max() <= _ulp16(o32).max()


# ================================================================================================
# 3. Output quantisation, bit for bit
# ================================================================================================
def quant_oracle(o32, seen, scale, offset, chan_shape):
    """docs/inference.md, independently of the reference: per tensor y = fp16(fp16(fp16(o)·fp16(s)) + fp16(off));
    per channel y = fp16(o·s[c] + off[c]) (fp32 multiply, then fp32 add); out = sat_int8(round_half_even(y)); rows
    that see no key: 0.  o32: float32 rows [..., Dv]; seen: bool [...] (the row saw a key).
    (torch rounds float32 -> float16 to nearest even with overflow to inf; the product of two fp16 is exact in
    fp32, and fp32 -> fp16 of a sum of two fp16 is correctly rounded since 24 >= 2·11 + 2.)"""
    if scale.numel() == 1:
        s16 = scale.float().reshape(()).half().float()
        off16 = (torch.zeros(()) if offset is None else offset.float().reshape(())).half().float()
        y = ((o32.half().float() * s16).half().float() + off16).half()
    else:
        t = o32 * scale.float().reshape(chan_shape)
        if offset is not None:
            t = t + offset.float().reshape(chan_shape)
        y = t.half()
    q = torch.round(y.float()).clamp(-128, 127).to(I8)
    return torch.where(seen.unsqueeze(-1), q, torch.zeros((), dtype=I8))


# o values that hit ties (x.5), the fp16 rounding of o or of o·s (2.5004 -> 2.5 -> 2, 126.51 -> 126.5 -> 126),
# saturation (beyond ±127.5, beyond the fp16 range) and tiny values (fp16 subnormals)
CRAFTED = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, -7.5, 126.5, 127.5, -128.5, -129.0, 200.0, -1000.0, 25.0, 0.25,
           0.75, 1e-3, 2.5004, -3.5003, 126.51, 65504.0, -65504.0, 1e5, -1e5, 3e-7, -0.4999, 0.5001]
# (scale, offset) per tensor: direct ties, fp16 arithmetic (fp16(0.1)·25 = 2.4994 -> fp16 2.5 -> 2, fp32 gives 3),
# offsets that make ties, negative scale, tiny scale
PER_TENSOR = [(1.0, None), (1.0, 0.5), (1.0, -0.5), (0.1, None), (0.1, 2.0), (3.0, -1.25), (0.37, 0.3), (-2.0, 1.0),
              (1e-3, 0.0), (1.0, 5.0)]


def _exact_row_problem(api, layout, dtype, Sq, gqa, seed, paged=None, partial=False):
    """A problem whose fp32 rows o are known exactly: every row sees exactly one key (P = 1, l = 1, o = v_j), some
    rows see none (fully masked row; a batch with KV length 0).  partial=True adds rows outside the valid query
    windows (query lengths < S, packed tail).  Returns (args, kw, o64 canonical, seen canonical, to_layout)."""
    rng = random.Random(seed)
    names = NAMES[api]
    tnd = layout in ("TND", "TND_NTD")
    decode = Sq == 1 and not tnd and api != PFA
    B = 3
    Nkv = 2
    Nq = Nkv * gqa
    D = Dv = 16
    Skv = Sq + 4 if not decode else 9
    # V: crafted values first, then random ones, in the query dtype
    lim = 65504.0 if dtype == F16 else 3e38
    vals = torch.tensor([min(max(x, -lim), lim) for x in CRAFTED], dtype=F64)
    vb = rnd((B, Nkv, Skv, Dv), F64, seed, scale=30.0)
    flat = vb.reshape(-1)
    for i in range(0, flat.numel(), 3):
        flat[i] = vals[(i // 3) % len(vals)]
    vb = vb.to(dtype)
    qb = rnd((B, Nq, Sq, D), dtype, seed + 1)
    kb = rnd((B, Nkv, Skv, D), dtype, seed + 2)
    lkv = [Skv, rng.randint(2, Skv), 0]
    lq = [Sq, max(1, Sq - 2) if partial else Sq, Sq]
    mask = torch.ones(B, 1, Sq, Skv, dtype=torch.bool)
    o = torch.zeros(B, Nq, Sq, Dv, dtype=F64)
    seen = torch.zeros(B, Nq, Sq, dtype=torch.bool)
    for b in range(B):
        for s in range(lq[b]):
            if lkv[b] == 0 or (b == 0 and s == Sq - 1):  # no key: KV length 0, or a fully masked row
                continue
            j = rng.randrange(lkv[b])
            mask[b, 0, s, j] = False
            for n in range(Nq):
                o[b, n, s] = vb[b, n // gqa, j].to(F64)
                seen[b, n, s] = True
    kw = {names["heads"]: Nq, "num_key_value_heads": Nkv, names["scale"]: 0.25, "input_layout": layout}
    qk, ok = {"BNSD_BSND": ("BNSD", "BSND"), "BSH_NBSD": ("BSH", "NBSD"), "BSND_BNSD": ("BSND", "BNSD"),
              "TND": ("TND", "TND"), "TND_NTD": ("TND", "NTD")}.get(layout, (layout, layout))
    if tnd:
        T = sum(lq) + (2 if partial else 0)
        q = pack(qb, lq, T)
        if paged:
            (k, v), table = make_paged([kb, vb], lkv, 4, paged, seed + 3)
            kw.update(block_table=table, block_size=4)
            kw[names["kvlen"]] = lkv
        else:
            k, v = pack(kb, lkv), pack(vb, lkv)
            kw[names["kvlen"]] = cum(lkv)
        kw[names["qlen"]] = cum(lq)
        kw["atten_mask"] = mask
        kw["sparse_mode"] = 1

        def to_layout(x):  # canonical [B, Nq, Sq, Dv] -> packed output [T, Nq, Dv] (tail rows 0)
            p = pack(x, lq, T)
            return p if ok == "TND" else p.transpose(0, 1).contiguous()
    else:
        q = from_bnsd(qb, qk)
        if paged:
            (k, v), table = make_paged([kb, vb], lkv, 4, paged, seed + 3)
            kw.update(block_table=table, block_size=4)
        else:
            k, v = from_bnsd(kb, qk), from_bnsd(vb, qk)
        kw[names["kvlen"]] = lkv
        if decode:
            kw["atten_mask"] = mask.reshape(B, Skv) if rng.random() < 0.5 else mask.reshape(B, 1, 1, Skv)
        else:
            kw["atten_mask"] = mask
            kw["sparse_mode"] = 1
            if partial:
                kw[names["qlen"]] = lq

        def to_layout(x):
            return from_bnsd(x, ok)
    return (q, k, v), kw, o, seen, to_layout


def _quant_configs(Nq, Dv, dtype, seed):
    """(scale, offset) pairs: per tensor, and per channel in several shapes and dtypes."""
    cfgs = [(torch.tensor([s]), None if off is None else torch.tensor([off])) for s, off in PER_TENSOR]
    cfgs.append((torch.tensor(0.1), torch.tensor(2.0)))  # 0-dim: one element
    n = Nq * Dv
    g = torch.Generator().manual_seed(seed)
    sc = (torch.rand(n, generator=g) * 8 + 0.05) * torch.where(torch.rand(n, generator=g) < 0.2, -1.0, 1.0)
    sc[::5] = 1.0  # ties of the crafted values
    off = torch.randint(-8, 9, (n,), generator=g).float() / 4  # multiples of 0.25: more ties
    for shape in [(n,), (1, 1, n), (1, Nq, 1, Dv), (Nq, Dv), (1, 1, Nq, Dv)]:
        cfgs.append((sc.reshape(shape), None))
        cfgs.append((sc.reshape(shape), off.reshape(shape)))
    cfgs.append((torch.ones(n), torch.full((n,), 0.5)))
    if dtype == BF16:  # bf16 scales with a bf16 query
        cfgs.append((sc.to(BF16), off.to(BF16)))
        cfgs.append((torch.tensor([0.1], dtype=BF16), torch.tensor([2.0], dtype=BF16)))
    return cfgs


OUTQ_CASES = ([(PFA, lay, 5, None) for lay in ("BSH", "BSND", "BNSD", "BNSD_BSND", "TND")] +
              [(IFA, lay, 1, pg) for lay in ("BSH", "BSND", "BNSD") for pg in (None, "BnBsH")] +
              [(FIA, lay, sq, None) for lay in ("BSH", "BNSD", "BNSD_BSND", "BSH_NBSD") for sq in (1, 5)] +
              [(FIA, "TND", 4, None), (FIA, "TND_NTD", 3, "BnNBsD"), (FIA, "BNSD", 1, "BnNBsD")] +
              [(FIA2, lay, sq, None) for lay in ("BSND", "BNSD") for sq in (1, 5)] +
              [(FIA2, "TND", 3, "BnBsH"), (FIA2, "BSH", 1, "BnBsH")])


def _outq_names(api):
    return ("quant_scale_out", "quant_offset_out") if api == FIA2 else ("quant_scale2", "quant_offset2")


@pytest.mark.parametrize("dtype", [F16, BF16, F32])
@pytest.mark.parametrize("api,layout,Sq,paged", OUTQ_CASES,
                         ids=[f"{SHORT[a]}-{b}-{c}-{d}" for a, b, c, d in OUTQ_CASES])
def test_output_quant_bit_exact(api, layout, Sq, paged, dtype):
    seed = 500 + OUTQ_CASES.index((api, layout, Sq, paged))
    gqa = 2 if seed % 2 else 1
    args, kw, o, seen, to_layout = _exact_row_problem(api, layout, dtype, Sq, gqa, seed, paged)
    Nq, Dv = o.shape[1], o.shape[3]
    sname, oname = _outq_names(api)
    fn = OPS[api]
    # the float output is the exact row (sanity of the construction)
    agree(first(fn(*args, **kw)), to_layout(o.to(dtype)), exact=True)
    for sc, off in _quant_configs(Nq, Dv, dtype, seed):
        kq = dict(kw)
        kq[sname] = sc
        if off is not None:
            kq[oname] = off
        if api == FIA2 and sc.numel() == 1:
            kq["out_dtype"] = torch.int8
        out = first(fn(*args, **kq))
        exp = to_layout(quant_oracle(o.to(F32), seen, sc, off, (Nq, 1, Dv)))
        r = first(ref_call(api, args, kq))
        assert out.dtype == I8 and r.dtype == I8
        assert torch.equal(r, exp), f"reference != oracle for scale {tuple(sc.shape)}"
        assert torch.equal(out, exp), (f"scale {sc.reshape(-1)[:3].tolist()} offset "
                                       f"{None if off is None else off.reshape(-1)[:3].tolist()}: "
                                       f"{int((out != exp).sum())} of {out.numel()} differ")


def test_output_quant_oracle_values():
    """The oracle itself on hand-computed values (so the bit-exact test above cannot agree on a wrong formula)."""
    seen = torch.ones(1, dtype=torch.bool)
    o = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5, 127.5, -128.5, 1e5, 25.0, 2.5004, 126.51]])
    assert quant_oracle(o, seen, torch.tensor([1.0]), None, (11,)).tolist() == [
        [0, 2, 2, 0, -2, 127, -128, 127, 25, 2, 126]]
    # fp16 arithmetic: fp16(0.1) = 0.0999755859375, 25·that = 2.49938964... -> fp16 2.5 -> 2 (fp32 would give 3)
    assert quant_oracle(torch.tensor([[25.0]]), seen, torch.tensor([0.1]), None, (1,)).item() == 2
    # per channel keeps fp32: 25·0.1f = 2.5000000373 -> fp16 2.5 -> 2; 2.5004·1 -> fp16 2.5 -> 2
    assert quant_oracle(torch.tensor([[25.0, 2.5004]]), seen, torch.tensor([0.1, 1.0]), None, (2,)).tolist() == [[2, 2]]
    # offsets: 1·1 + 0.5 = 1.5 -> 2; 1·1 - 0.5 = 0.5 -> 0; unseen row -> 0 whatever the offset
    assert quant_oracle(torch.tensor([[1.0]]), seen, torch.tensor([1.0]), torch.tensor([0.5]), (1,)).item() == 2
    assert quant_oracle(torch.tensor([[1.0]]), seen, torch.tensor([1.0]), torch.tensor([-0.5]), (1,)).item() == 0
    assert quant_oracle(torch.tensor([[1.0]]), ~seen, torch.tensor([1.0]), torch.tensor([7.0]), (1,)).item() == 0


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("api", [PFA, IFA, FIA, FIA2])
def test_output_quant_known_answers(api, dtype):
    """One key: o = v exactly = the crafted values; literal answers for the discriminating cases."""
    lim = 65504.0 if dtype == F16 else 3e38
    vals = torch.tensor([min(max(x, -lim), lim) for x in CRAFTED], dtype=F64).to(dtype)
    Dv = vals.numel()
    Sq = 1 if api == IFA else 2
    q, k = rnd((1, 1, Sq, Dv), dtype, 57), rnd((1, 1, 1, Dv), dtype, 58)
    v = vals.view(1, 1, 1, Dv)
    names = NAMES[api]
    sname, oname = _outq_names(api)
    kw = {names["heads"]: 1, "input_layout": "BNSD", names["scale"]: 0.1}
    o = vals.float().view(1, 1, 1, Dv).expand(1, 1, Sq, Dv)
    seen = torch.ones(1, 1, Sq, dtype=torch.bool)
    cfgs = [(torch.tensor([s_]), None if off is None else torch.tensor([off])) for s_, off in PER_TENSOR]
    cfgs += [(torch.ones(Dv), None), (torch.ones(Dv), torch.full((Dv,), 0.5)),
             (runif((Dv,), -3, 3, 59), runif((Dv,), -2, 2, 60))]
    got = {}
    for sc, off in cfgs:
        kq = dict(kw, **{sname: sc})
        if off is not None:
            kq[oname] = off
        out = first(OPS[api](q, k, v, **kq))
        exp = quant_oracle(o, seen, sc, off, (1, 1, Dv))
        assert out.dtype == I8
        assert torch.equal(out, exp), [(x, int(a), int(b)) for x, a, b in zip(vals.tolist(), out[0, 0, 0],
                                                                              exp[0, 0, 0]) if a != b]
        assert torch.equal(first(ref_call(api, (q, k, v), kq)), exp)
        got[(sc.numel(), float(sc.reshape(-1)[0]), None if off is None else float(off.reshape(-1)[0]))] = \
            dict(zip(CRAFTED, out[0, 0, 0].tolist()))
    per_t = got[(1, 1.0, None)]
    assert [per_t[x] for x in (0.5, 1.5, 2.5, -0.5, -2.5, 127.5, -128.5, 200.0, -1000.0)] == \
        [0, 2, 2, 0, -2, 127, -128, 127, -128]
    assert got[(1, 0.10000000149011612, None)][25.0] == 2  # fp16 arithmetic: fp16(0.1)·25 -> 2.5 -> 2
    assert got[(1, 1.0, 0.5)][1.5] == 2 and got[(1, 1.0, -0.5)][3.5] == 3  # 1.5 + 0.5 = 2, 3.5 - 0.5 = 3
    assert got[(1, 1.0, 0.5)][2.5004 if dtype == F32 else 2.5] == 3  # 2.5 + 0.5 = 3 (fp16 2.5004 -> 2.5)
    if dtype == F32:
        assert per_t[2.5004] == 2 and per_t[126.51] == 126  # o rounded to fp16 first
        assert got[(Dv, 1.0, None)][2.5004] == 2 and got[(Dv, 1.0, None)][126.51] == 126  # per channel: fp16 too
        assert per_t[1e5] == 127 and per_t[-1e5] == -128  # beyond the fp16 range: saturated


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("api", [PFA, IFA, FIA, FIA2])
@pytest.mark.parametrize("per_channel", [False, True])
def test_output_quant_random_attention(api, dtype, per_channel):
    """Random attention: fp32 query -> int8 == the oracle on the op's own fp32 output, bit for bit; fp16/bf16
    queries -> within 1 of the reference (the fp32 row is not observable)."""
    B, Nq, Nkv, S, D = 2, 4, 2, 150, 32
    Sq = 1 if api == IFA else 9
    q, k = rnd((B, Nq, Sq, D), dtype, 31), rnd((B, Nkv, S, D), dtype, 32)
    v = rnd((B, Nkv, S, D), dtype, 33, scale=40.0)
    names = NAMES[api]
    kw = {names["heads"]: Nq, "num_key_value_heads": Nkv, "input_layout": "BNSD", names["scale"]: 0.2,
          names["kvlen"]: [S, 77]}
    fn = OPS[api]
    o = first(fn(q, k, v, **kw))
    sname, oname = _outq_names(api)
    if per_channel:
        sc, off = runif((Nq, D), 0.5, 3.0, 34), runif((Nq, D), -1.0, 1.0, 35)
    else:
        sc, off = torch.tensor([1.7]), torch.tensor([-0.25])
    kq = dict(kw, **{sname: sc, oname: off})
    out = first(fn(q, k, v, **kq))
    r = first(ref_call(api, (q, k, v), kq))
    d = (out.to(torch.int32) - r.to(torch.int32)).abs()
    # bf16/fp16 rows carry P rounded to the dtype (decision 9): a few elements land across a rounding boundary
    assert d.max() <= 1 and d.count_nonzero() <= out.numel() // (20 if dtype == BF16 else 100)
    if dtype == F32:
        exp = quant_oracle(o, torch.ones(o.shape[:-1], dtype=torch.bool), sc, off, (Nq, 1, D))
        agree(out, exp, exact=True)


@pytest.mark.parametrize("api", [IFA, FIA, FIA2])
def test_output_quant_with_antiquant_kv(api):
    """int8 KV in, int8 out: within 1 of the reference; fp32-query problem bit for bit with the op's fp32 output."""
    B, Nq, Nkv, S, D = 2, 4, 2, 90, 16
    q = rnd((B, Nq, 1, D), F16, 41)
    k8, v8 = rint8((B, Nkv, S, D), 42), rint8((B, Nkv, S, D), 43)
    sc, off = runif((2, Nkv, 1, D), 0.05, 0.2, 44, F16), rint_off((2, Nkv, 1, D), 45, F16)
    names = NAMES[api]
    kw = {names["heads"]: Nq, "num_key_value_heads": Nkv, "input_layout": "BNSD", names["kvlen"]: [S, 0]}
    if api == IFA:
        kw.update(antiquant_scale=sc, antiquant_offset=off)
    else:
        kw.update({names["ks"]: sc[0], names["ko"]: off[0], names["vs"]: sc[1], names["vo"]: off[1]})
    sname, oname = _outq_names(api)
    kw.update({sname: runif((Nq * D,), 1.0, 5.0, 46), oname: runif((Nq * D,), -2, 2, 47)})
    out = first(OPS[api](q, k8, v8, **kw))
    r = first(ref_call(api, (q, k8, v8), kw))
    d = (out.to(torch.int32) - r.to(torch.int32)).abs()
    assert out.dtype == I8 and d.max() <= 1 and d.count_nonzero() <= out.numel() // 50
    assert (out[1] == 0).all(), "a batch without keys must be int8 0"


def test_output_quant_full_int8_exact_rows():
    """Full int8 in, int8 out, bit for bit: rows that see one key have o = v_i8 · qs1 · deq2 exactly (powers of
    two), quantised per the documented formula."""
    B, Nq, Sq, Skv, D = 2, 2, 6, 8, 16
    q, k, v = rint8((B, Nq, Sq, D), 51), rint8((B, Nq, Skv, D), 52), rint8((B, Nq, Skv, D), 53)
    rng = random.Random(54)
    mask = torch.ones(B, 1, Sq, Skv, dtype=torch.bool)
    o = torch.zeros(B, Nq, Sq, D)
    seen = torch.zeros(B, Nq, Sq, dtype=torch.bool)
    qs1, deq2 = 64.0, 2.0 ** -7
    for b in range(B):
        for s in range(Sq - (b == 1)):  # the last row of batch 1 sees nothing
            j = rng.randrange(Skv)
            mask[b, 0, s, j] = False
            o[b, :, s] = v[b, :, j].float() * (qs1 * deq2)
            seen[b, :, s] = True
    for sc, off in [(torch.tensor([1.0]), None), (torch.tensor([0.1]), torch.tensor([2.0])),
                    (runif((Nq * D,), -4, 4, 55), runif((Nq * D,), -1, 1, 56))]:
        kw = dict(num_heads=Nq, input_layout="BNSD", atten_mask=mask, sparse_mode=1, quant_scale2=sc,
                  quant_offset2=off, deq_scale1=torch.tensor([1e-3]), quant_scale1=torch.tensor([qs1]),
                  deq_scale2=torch.tensor([deq2]))
        out = pfa(q, k, v, **kw)
        exp = quant_oracle(o, seen, sc, off, (Nq, 1, D))
        agree(out, exp, exact=True)
        agree(ref_call(PFA, (q, k, v), kw), exp, exact=True)


# ================================================================================================
# 4. npu_trans_quant_param
# ================================================================================================
def f32_of_bits(u):
    return torch.tensor([u], dtype=torch.int64).to(torch.int32).view(F32) if u < 2 ** 31 else \
        torch.tensor([u - 2 ** 32], dtype=torch.int32).view(F32)


def _bits(*us):
    return torch.cat([f32_of_bits(u) for u in us])


TQP_BITS = [  # (fp32 bits in, word out with round_mode 0, word out with round_mode 1)
    (0x3F800000, 0x3F800000, 0x3F800000),  # 1.0
    (0x3F000000, 0x3F000000, 0x3F000000),  # 0.5
    (0xC0000000, 0xC0000000, 0xC0000000),  # -2.0: the sign stays in bit 31 (the word is still positive)
    (0x3DCCCCCD, 0x3DCCC000, 0x3DCCC000),  # 0.1: the 13 low bits 0x0CCD < half -> truncated either way
    (0x3F800001, 0x3F800000, 0x3F800000),
    (0x3F800FFF, 0x3F800000, 0x3F800000),  # just below half
    (0x3F801000, 0x3F800000, 0x3F802000),  # exactly half: rounds up (away from zero on the magnitude)
    (0x3F801800, 0x3F800000, 0x3F802000),
    (0xBF801800, 0xBF800000, 0xBF802000),  # negative: magnitude rounded
    (0x3FFFF000, 0x3FFFE000, 0x40000000),  # carry into the exponent: 2.0
    (0x3A83126F, 0x3A830000, 0x3A832000),  # 0.001
    (0x00000001, 0x00000000, 0x00000000),  # subnormal below the kept bits
]


@pytest.mark.parametrize("round_mode", [0, 1])
def test_trans_quant_param_bit_patterns(round_mode):
    scale = _bits(*(b for b, _, _ in TQP_BITS))
    out = tqp(scale, round_mode=round_mode)
    assert out.dtype == torch.int64 and tuple(out.shape) == (len(TQP_BITS),)
    exp = [FLAG46 | (w0 if round_mode == 0 else w1) for _, w0, w1 in TQP_BITS]
    assert out.tolist() == exp, [hex(x) for x in out.tolist()]
    assert out.tolist() == REF.npu_trans_quant_param(scale, round_mode=round_mode).tolist()


def test_trans_quant_param_default_and_literal_values():
    assert tqp(torch.tensor([1.0])).tolist() == [0x40003F800000]
    assert tqp(torch.tensor([1.0, 0.5])).tolist() == [0x40003F800000, 0x40003F000000]
    assert tqp(torch.tensor([-2.0])).tolist() == [0x4000C0000000]


OFFSETS = [(3.0, 3), (-1.0, -1), (2.5, 3), (-2.5, -3), (0.49, 0), (-0.5, -1), (300.0, 255), (-300.0, -256),
           (255.4, 255), (255.5, 255), (-256.5, -256), (-256.6, -256), (0.0, 0), (-0.0, 0), (1e9, 255), (-1e9, -256),
           (100.5, 101), (-100.5, -101)]


def test_trans_quant_param_offsets():
    """Offsets: round half away from zero, clamp to [-256, 255], 9-bit two's complement in bits 37-45."""
    n = len(OFFSETS)
    scale = torch.full((n,), 0.25)
    off = torch.tensor([o for o, _ in OFFSETS])
    out = tqp(scale, off)
    exp = [FLAG46 | 0x3E800000 | ((r & 0x1FF) << 37) for _, r in OFFSETS]
    assert out.tolist() == exp, [(o, hex(a), hex(b)) for (o, _), a, b in zip(OFFSETS, out.tolist(), exp) if a != b]
    assert out.tolist() == REF.npu_trans_quant_param(scale, off).tolist()
    # the literal word of offset -1: all nine bits set
    assert tqp(torch.tensor([1.0]), torch.tensor([-1.0])).tolist() == [0x40003F800000 | (0x1FF << 37)]
    # round_mode 1 with an offset: both parts
    w = tqp(_bits(0x3F801000), torch.tensor([-256.0]), round_mode=1).item()
    assert w == FLAG46 | 0x3F802000 | (0x100 << 37)


def test_trans_quant_param_shapes():
    s = torch.tensor([[0.5, 0.25, 3.0]])  # (1, n)
    out = tqp(s)
    assert tuple(out.shape) == (1, 3) and out.dtype == torch.int64
    assert out.reshape(-1).tolist() == tqp(s.reshape(-1)).tolist()
    # one offset for every scale
    a = tqp(s.reshape(-1), torch.tensor([7.0]))
    b = tqp(s.reshape(-1), torch.tensor([7.0, 7.0, 7.0]))
    assert a.tolist() == b.tolist() == [FLAG46 | (x & 0xFFFFE000) | (7 << 37)
                                        for x in s.reshape(-1).view(torch.int32).tolist()]
    c = tqp(s, torch.tensor([[1.0, -2.0, 3.0]]))
    assert tuple(c.shape) == (1, 3)
    assert [(x >> 37) & 0x1FF for x in c.reshape(-1).tolist()] == [1, 0x1FE, 3]
    assert tqp(torch.empty(0)).numel() == 0


# ================================================================================================
# 5. Errors: ValueError / TypeError naming the op and the argument
# ================================================================================================
def _e_tensors():
    B, Nq, Nkv, S, D = 2, 4, 2, 10, 16
    e = dict(B=B, Nq=Nq, Nkv=Nkv, S=S, D=D)
    e["Q"], e["Q1"] = rnd((B, Nq, 8, D), F16, 1), rnd((B, Nq, 1, D), F16, 2)
    e["K"], e["V"] = rnd((B, Nkv, S, D), F16, 3), rnd((B, Nkv, S, D), F16, 4)
    e["Q8"], e["Q18"] = rint8((B, Nq, 8, D), 5), rint8((B, Nq, 1, D), 6)
    e["K8"], e["V8"] = rint8((B, Nkv, S, D), 7), rint8((B, Nkv, S, D), 8)
    e["K32"], e["V32"] = e["K8"].view(torch.int32), e["V8"].view(torch.int32)  # int4 packed: D / 8 ... per int32
    e["SC"] = runif((Nkv, D), 0.01, 0.03, 9, F16)  # per channel
    e["SC2"] = runif((2, Nkv, 1, D), 0.01, 0.03, 10, F16)  # combined
    e["ONE"] = torch.tensor([0.01])
    e["KP8"], e["VP8"] = rint8((4, 4, Nkv * D), 11), rint8((4, 4, Nkv * D), 12)
    e["TABLE"] = torch.tensor([[0, 1, 2], [3, 0, 1]], dtype=torch.int32)
    return e


E = _e_tensors()
KW_I = dict(num_heads=E["Nq"], num_key_value_heads=E["Nkv"], input_layout="BNSD")
KW_F = dict(num_heads=E["Nq"], num_key_value_heads=E["Nkv"], input_layout="BNSD")
KW_F2 = dict(num_query_heads=E["Nq"], num_key_value_heads=E["Nkv"], input_layout="BNSD")
DEQ_P = dict(deq_scale1=torch.tensor([1e-3]), quant_scale1=torch.tensor([127.0]), deq_scale2=torch.tensor([1e-3]))
DEQ_F = dict(dequant_scale1=torch.tensor([1e-3]), quant_scale1=torch.tensor([127.0]),
             dequant_scale2=torch.tensor([1e-3]))


def _kv_quant(names, ks, vs, ko, vo, km, vm):
    """Separate K/V (anti)quant arguments under `names` (modes, then scales and offsets); None left out."""
    d = {names[0]: km, names[1]: vm}
    d.update({n: x for n, x in zip(names[2:], (ks, vs, ko, vo)) if x is not None})
    return d


def _sep(ks=None, vs=None, ko=None, vo=None, km=0, vm=0):
    return _kv_quant(("key_antiquant_mode", "value_antiquant_mode", "key_antiquant_scale", "value_antiquant_scale",
                      "key_antiquant_offset", "value_antiquant_offset"), ks, vs, ko, vo, km, vm)


def _sep2(ks=None, vs=None, ko=None, vo=None, km=0, vm=0):
    return _kv_quant(("key_quant_mode", "value_quant_mode", "dequant_scale_key", "dequant_scale_value",
                      "dequant_offset_key", "dequant_offset_value"), ks, vs, ko, vo, km, vm)


def _without(d, name):
    return {k: v for k, v in d.items() if k != name}


Q, Q1, K, V, Q8, Q18, K8, V8, SC, SC2, ONE = (E[n] for n in ("Q", "Q1", "K", "V", "Q8", "Q18", "K8", "V8", "SC", "SC2",
                                                            "ONE"))
B_, S_, NKV_, D_ = E["B"], E["S"], E["Nkv"], E["D"]
TOK = torch.full((B_, S_), 0.02)  # per token (B, KV_S), fp32
PAGED_F = dict(block_table=E["TABLE"], block_size=4, actual_seq_lengths_kv=[9, 5])

ERR_CASES = [
    # ---- full int8: all three scales, only with an int8 query ----
    ("pfa_int8_q_no_scales", lambda: pfa(Q8, K8, V8, **KW_F), PFA, ["deq_scale1"]),
    ("pfa_int8_q_no_quant_scale1", lambda: pfa(Q8, K8, V8, **KW_F, **_without(DEQ_P, "quant_scale1")), PFA,
     ["quant_scale1"]),
    ("pfa_int8_q_no_deq_scale2", lambda: pfa(Q8, K8, V8, **KW_F, **_without(DEQ_P, "deq_scale2")), PFA,
     ["deq_scale2"]),
    ("fia_int8_q_no_scales", lambda: fia(Q8, K8, V8, **KW_F), FIA, ["dequant_scale1"]),
    ("fia_int8_q_no_dequant_scale2", lambda: fia(Q8, K8, V8, **KW_F, **_without(DEQ_F, "dequant_scale2")), FIA,
     ["dequant_scale2"]),
    ("pfa_float_q_deq_scale1", lambda: pfa(Q, K, V, **KW_F, deq_scale1=ONE), PFA, ["deq_scale1"]),
    ("pfa_float_q_all_deq", lambda: pfa(Q, K, V, **KW_F, **DEQ_P), PFA, ["deq_scale1"]),
    ("fia_float_q_quant_scale1", lambda: fia(Q, K, V, **KW_F, quant_scale1=ONE), FIA, ["quant_scale1"]),
    ("fia_float_q_dequant_scale2", lambda: fia(Q1, K8, V8, **KW_F, dequant_scale2=ONE, antiquant_scale=SC2), FIA,
     ["dequant_scale2"]),
    ("ifa_dequant_scale1", lambda: ifa(Q1, K, V, **KW_I, dequant_scale1=ONE), IFA, ["dequant_scale1"]),
    ("ifa_quant_scale1", lambda: ifa(Q1, K, V, **KW_I, quant_scale1=ONE), IFA, ["quant_scale1"]),
    ("ifa_int8_query", lambda: ifa(Q18, K8, V8, **KW_I, dequant_scale1=ONE, quant_scale1=ONE, dequant_scale2=ONE),
     IFA, ["query"]),
    ("fia2_int8_query", lambda: fia2(Q8, K8, V8, **KW_F2), FIA2, ["query"]),
    ("fia2_dequant_scale_query", lambda: fia2(Q8, K8, V8, **KW_F2, dequant_scale_query=torch.ones(B_, 4, 8)), FIA2,
     ["dequant_scale_query"]),
    ("fia2_dequant_scale_query_float_q", lambda: fia2(Q1, K8, V8, **KW_F2, dequant_scale_query=ONE,
                                                      **_sep2(SC, SC)), FIA2, ["dequant_scale_query"]),
    ("pfa_int8_q_float_kv", lambda: pfa(Q8, K, V, **KW_F, **DEQ_P), PFA, ["key|value"]),
    ("fia_int8_q_with_antiquant", lambda: fia(Q8, K8, V8, **KW_F, **DEQ_F, **_sep(SC, SC)), FIA, ["antiquant"]),
    # ---- int4 (int32-packed) KV ----
    ("fia_int4_kv", lambda: fia(Q1, E["K32"], E["V32"], **KW_F, **_sep(SC, SC)), FIA, ["key"]),
    ("ifa_int4_kv", lambda: ifa(Q1, E["K32"], E["V32"], **KW_I, antiquant_scale=SC2), IFA, ["key"]),
    ("fia2_int4_kv", lambda: fia2(Q1, E["K32"], E["V32"], **KW_F2, **_sep2(SC, SC)), FIA2, ["key"]),
    ("pfa_int4_kv", lambda: pfa(Q, E["K32"], E["V32"], **KW_F), PFA, ["key"]),
    # ---- output quantisation ----
    ("pfa_offset2_no_scale2", lambda: pfa(Q, K, V, **KW_F, quant_offset2=ONE), PFA, ["quant_offset2"]),
    ("ifa_offset2_no_scale2", lambda: ifa(Q1, K, V, **KW_I, quant_offset2=ONE), IFA, ["quant_offset2"]),
    ("fia_offset2_no_scale2", lambda: fia(Q, K, V, **KW_F, quant_offset2=ONE), FIA, ["quant_offset2"]),
    ("fia2_offset_out_no_scale_out", lambda: fia2(Q, K, V, **KW_F2, quant_offset_out=ONE), FIA2,
     ["quant_offset_out"]),
    ("pfa_scale2_numel", lambda: pfa(Q, K, V, **KW_F, quant_scale2=torch.ones(E["Nq"] * D_ + 1)), PFA,
     ["quant_scale2"]),
    ("ifa_scale2_numel", lambda: ifa(Q1, K, V, **KW_I, quant_scale2=torch.ones(2)), IFA, ["quant_scale2"]),
    ("fia2_scale_out_numel", lambda: fia2(Q, K, V, **KW_F2, quant_scale_out=torch.ones(D_)), FIA2,
     ["quant_scale_out"]),
    ("fia_offset2_numel", lambda: fia(Q, K, V, **KW_F, quant_scale2=torch.ones(E["Nq"] * D_),
                                      quant_offset2=torch.ones(1)), FIA, ["quant_offset2"]),
    ("fia_scale2_int", lambda: fia(Q, K, V, **KW_F, quant_scale2=torch.ones(1, dtype=torch.int32)), FIA,
     ["quant_scale2"]),
    ("fia2_out_dtype_float", lambda: fia2(Q, K, V, **KW_F2, quant_scale_out=ONE, out_dtype=torch.float16), FIA2,
     ["out_dtype"]),
    # int8 output refuses bands with negative pre/next (prefill, mask)
    ("fia_int8_out_negative_next", lambda: fia(Q, K, V, **KW_F, quant_scale2=ONE,
                                               atten_mask=torch.zeros(8, S_, dtype=torch.bool), next_tokens=-1), FIA,
     ["quant_scale2"]),
    ("fia_int8_out_negative_pre_m4", lambda: fia(Q, K, V, **KW_F, quant_scale2=ONE, atten_mask=TRIU2048,
                                                 sparse_mode=4, pre_tokens=-2, next_tokens=3), FIA, ["quant_scale2"]),
    ("pfa_int8_out_negative_next", lambda: pfa(Q, K, V, **KW_F, quant_scale2=ONE,
                                               atten_mask=torch.zeros(8, S_, dtype=torch.bool), next_tokens=-2), PFA,
     ["quant_scale2"]),
    ("pfa_full_int8_out_negative_pre", lambda: pfa(Q8, K8, V8, **KW_F, **DEQ_P, quant_scale2=ONE,
                                                   atten_mask=torch.zeros(8, S_, dtype=torch.bool), pre_tokens=-1),
     PFA, ["quant_scale2"]),
    ("fia2_int8_out_negative_next", lambda: fia2(Q, K, V, **KW_F2, quant_scale_out=ONE,
                                                 atten_mask=torch.zeros(8, S_, dtype=torch.bool), next_tokens=-1),
     FIA2, ["quant_scale_out"]),
    # ---- full-int8 scales ----
    ("pfa_deq_scale1_packed_offset", lambda: pfa(Q8, K8, V8, **KW_F, **dict(DEQ_P, deq_scale1=tqp(
        torch.tensor([1e-3]), torch.tensor([3.0])))), PFA, ["deq_scale1"]),
    ("pfa_deq_scale2_packed_offset", lambda: pfa(Q8, K8, V8, **KW_F, **dict(DEQ_P, deq_scale2=tqp(
        torch.tensor([1e-3]), torch.tensor([-1.0])))), PFA, ["deq_scale2"]),
    ("fia_dequant_scale1_packed_offset", lambda: fia(Q8, K8, V8, **KW_F, **dict(DEQ_F, dequant_scale1=tqp(
        torch.tensor([1e-3]), torch.tensor([1.0])))), FIA, ["dequant_scale1"]),
    ("pfa_deq_scale1_two_values", lambda: pfa(Q8, K8, V8, **KW_F, **dict(DEQ_P, deq_scale1=torch.ones(2))), PFA,
     ["deq_scale1"]),
    ("fia_quant_scale1_two_values", lambda: fia(Q8, K8, V8, **KW_F, **dict(DEQ_F, quant_scale1=torch.ones(2))), FIA,
     ["quant_scale1"]),
    # ---- antiquant combination rules ----
    ("fia_int8_kv_no_scales", lambda: fia(Q1, K8, V8, **KW_F), FIA, ["antiquant_scale"]),
    ("ifa_int8_kv_no_scales", lambda: ifa(Q1, K8, V8, **KW_I), IFA, ["antiquant_scale"]),
    ("fia2_int8_kv_no_scales", lambda: fia2(Q1, K8, V8, **KW_F2), FIA2, ["dequant_scale_key"]),
    ("fia_int8_kv_offset_only", lambda: fia(Q1, K8, V8, **KW_F, **_sep(ko=SC, vo=SC)), FIA, ["antiquant_scale"]),
    ("fia_float_kv_with_scales", lambda: fia(Q1, K, V, **KW_F, **_sep(SC, SC)), FIA, ["antiquant"]),
    ("fia_float_kv_with_combined", lambda: fia(Q1, K, V, **KW_F, antiquant_scale=SC2), FIA, ["antiquant"]),
    ("ifa_float_kv_with_scales", lambda: ifa(Q1, K, V, **KW_I, antiquant_scale=SC2), IFA, ["antiquant"]),
    # (found by this file: the message used to say "antiquant scales/offsets", none of v2's argument names)
    ("fia2_float_kv_with_scales", lambda: fia2(Q1, K, V, **KW_F2, **_sep2(SC, SC)), FIA2,
     ["dequant_scale_key|dequant_scale_value"]),
    ("fia_modes_1_0", lambda: fia(Q1, K8, V8, **KW_F, **_sep(TOK, SC, km=1, vm=0)), FIA, ["key_antiquant_mode"]),
    ("fia_modes_2_3", lambda: fia(Q1, K8, V8, **KW_F, **_sep(torch.ones(NKV_), torch.ones(B_, NKV_, S_), km=2, vm=3)),
     FIA, ["key_antiquant_mode"]),
    ("fia_modes_0_2", lambda: fia(Q1, K8, V8, **KW_F, **_sep(SC, torch.ones(NKV_), km=0, vm=2)), FIA,
     ["key_antiquant_mode"]),
    ("fia2_modes_0_3", lambda: fia2(Q1, K8, V8, **KW_F2, **_sep2(SC, torch.ones(B_, NKV_, S_), km=0, vm=3)), FIA2,
     ["key_quant_mode"]),
    ("fia_mode_6", lambda: fia(Q1, K8, V8, **KW_F, **_sep(SC, SC, km=6, vm=6)), FIA, ["key_antiquant_mode"]),
    ("fia_combined_mode_2", lambda: fia(Q1, K8, V8, **KW_F, antiquant_scale=SC2, antiquant_mode=2), FIA,
     ["antiquant_mode"]),
    ("fia_key_scale_alone", lambda: fia(Q1, K8, V8, **KW_F, **_sep(ks=SC)), FIA, ["value_antiquant_scale"]),
    ("fia_value_scale_alone", lambda: fia(Q1, K8, V8, **KW_F, **_sep(vs=SC)), FIA, ["key_antiquant_scale"]),
    ("fia2_key_scale_alone", lambda: fia2(Q1, K8, V8, **KW_F2, **_sep2(ks=SC)), FIA2, ["dequant_scale_value"]),
    ("fia_key_offset_alone", lambda: fia(Q1, K8, V8, **KW_F, **_sep(SC, SC, ko=SC)), FIA, ["value_antiquant_offset"]),
    ("fia2_value_offset_alone", lambda: fia2(Q1, K8, V8, **KW_F2, **_sep2(SC, SC, vo=SC)), FIA2,
     ["dequant_offset_key"]),
    ("fia_offset_shape", lambda: fia(Q1, K8, V8, **KW_F, **_sep(SC, SC, torch.ones(NKV_), torch.ones(NKV_))), FIA,
     ["key_antiquant_offset"]),
    ("ifa_offset_shape", lambda: ifa(Q1, K8, V8, **KW_I, antiquant_scale=SC2, antiquant_offset=torch.ones(2)), IFA,
     ["antiquant_offset"]),
    ("fia_per_channel_numel", lambda: fia(Q1, K8, V8, **KW_F, **_sep(torch.ones(NKV_ * D_ + 1), SC)), FIA,
     ["key_antiquant_scale"]),
    ("fia_value_per_channel_numel", lambda: fia(Q1, K8, V8, **KW_F, **_sep(SC, torch.ones(NKV_, D_ - 1))), FIA,
     ["value_antiquant_scale"]),
    ("ifa_per_channel_numel", lambda: ifa(Q1, K8, V8, **KW_I, antiquant_scale=torch.ones(2, NKV_, 1, D_ + 1)), IFA,
     ["antiquant_scale"]),
    ("ifa_combined_first_axis", lambda: ifa(Q1, K8, V8, **KW_I, antiquant_scale=torch.ones(3, NKV_, 1, D_)), IFA,
     ["antiquant_scale"]),
    ("fia2_per_channel_numel", lambda: fia2(Q1, K8, V8, **KW_F2, **_sep2(torch.ones(NKV_ * D_ * 2), SC)), FIA2,
     ["dequant_scale_key"]),
    ("fia_mode2_shape", lambda: fia(Q1, K8, V8, **KW_F, **_sep(torch.ones(NKV_ + 1), torch.ones(NKV_ + 1), km=2,
                                                               vm=2)), FIA, ["key_antiquant_scale"]),
    ("fia_per_token_short", lambda: fia(Q1, K8, V8, **KW_F, **_sep(TOK[:, :S_ - 1], TOK[:, :S_ - 1], km=1, vm=1)),
     FIA, ["key_antiquant_scale"]),
    ("fia_value_per_token_short", lambda: fia(Q1, K8, V8, **KW_F, **_sep(SC, TOK[:, :S_ - 1], km=0, vm=1)), FIA,
     ["value_antiquant_scale"]),
    ("fia_per_token_short_lengths", lambda: fia(Q1, K8, V8, **KW_F, actual_seq_lengths_kv=[S_, 4],
                                                **_sep(TOK[:, :S_ - 1], TOK[:, :S_ - 1], km=1, vm=1)), FIA,
     ["key_antiquant_scale"]),
    ("fia_mode3_short", lambda: fia(Q1, K8, V8, **KW_F, **_sep(torch.ones(B_, NKV_, 3), torch.ones(B_, NKV_, 3),
                                                               km=3, vm=3)), FIA, ["key_antiquant_scale"]),
    ("fia_mode3_bad_batch", lambda: fia(Q1, K8, V8, **KW_F, **_sep(torch.ones(B_ + 1, NKV_, S_),
                                                                   torch.ones(B_ + 1, NKV_, S_), km=3, vm=3)), FIA,
     ["key_antiquant_scale"]),
    ("ifa_combined_per_token_short", lambda: fia(Q1, K8, V8, **KW_F, antiquant_scale=torch.ones(2, B_, S_ - 2),
                                                 antiquant_mode=1), FIA, ["antiquant_scale"]),
    ("fia2_per_token_short", lambda: fia2(Q1, K8, V8, **KW_F2, **_sep2(TOK[:, :2], TOK[:, :2], km=1, vm=1)), FIA2,
     ["dequant_scale_key"]),
    ("fia_mode4_no_table", lambda: fia(Q1, K8, V8, **KW_F, **_sep(torch.ones(4, 4), torch.ones(4, 4), km=4, vm=4)),
     FIA, ["block_table"]),
    ("fia_mode5_no_table", lambda: fia(Q1, K8, V8, **KW_F, **_sep(torch.ones(4, NKV_, 4), torch.ones(4, NKV_, 4),
                                                                  km=5, vm=5)), FIA, ["block_table"]),
    ("fia2_mode4_no_table", lambda: fia2(Q1, K8, V8, **KW_F2, **_sep2(torch.ones(4, 4), torch.ones(4, 4), km=4,
                                                                      vm=4)), FIA2, ["block_table"]),
    ("fia_mode4_pool_shape", lambda: fia(Q1, E["KP8"], E["VP8"], **KW_F, **PAGED_F,
                                         **_sep(torch.ones(4, 5), torch.ones(4, 5), km=4, vm=4)), FIA,
     ["key_antiquant_scale"]),
    ("fia_mode5_pool_shape", lambda: fia(Q1, E["KP8"], E["VP8"], **KW_F, **PAGED_F,
                                         **_sep(torch.ones(3, NKV_, 4), torch.ones(3, NKV_, 4), km=5, vm=5)), FIA,
     ["key_antiquant_scale"]),
    ("fia_tnd_per_token_no_table", lambda: fia(rnd((8, E["Nq"], D_), F16, 3), rint8((10, NKV_, D_), 4),
                                               rint8((10, NKV_, D_), 5), num_heads=E["Nq"],
                                               num_key_value_heads=NKV_, input_layout="TND",
                                               actual_seq_lengths=[3, 8], actual_seq_lengths_kv=[4, 10],
                                               **_sep(torch.ones(2, 10), torch.ones(2, 10), km=1, vm=1)), FIA,
     ["key_antiquant_scale"]),
    ("fia_antiquant_shared_prefix", lambda: fia(Q1, K8, V8, **KW_F, **_sep(SC, SC), key_shared_prefix=K8[:1],
                                                value_shared_prefix=V8[:1]), FIA, ["shared_prefix|antiquant"]),
    ("fia_scale_int_dtype", lambda: fia(Q1, K8, V8, **KW_F, **_sep(torch.ones(NKV_, D_, dtype=torch.int32), SC)), FIA,
     ["key_antiquant_scale"]),
    ("fia_int8_key_float_value", lambda: fia(Q1, K8, V, **KW_F, **_sep(SC, SC)), FIA, ["value|key"]),
    # ---- npu_trans_quant_param ----
    ("tqp_round_mode_2", lambda: tqp(torch.tensor([1.0]), round_mode=2), "npu_trans_quant_param", ["round_mode"]),
    ("tqp_scale_2d", lambda: tqp(torch.ones(2, 3)), "npu_trans_quant_param", ["scale"]),
    ("tqp_offset_numel", lambda: tqp(torch.ones(3), torch.ones(2)), "npu_trans_quant_param", ["offset"]),
]


@pytest.mark.parametrize("name,thunk,opname,needles", ERR_CASES, ids=[c[0] for c in ERR_CASES])
def test_quant_errors(name, thunk, opname, needles):
    with pytest.raises((ValueError, TypeError), match=re.escape(opname)) as ei:
        thunk()
    msg = str(ei.value).lower()
    for needle in needles:
        assert any(n.lower() in msg for n in needle.split("|")), f"message does not name {needle!r}: {ei.value}"


def test_pfa_int8_kv_message_names_pfa_arguments():
    """PFA has no KV antiquant: int8 key/value with a float query is refused without pointing to arguments PFA does
    not have (found by this file: the message used to ask for key_antiquant_scale/... or antiquant_scale)."""
    with pytest.raises((ValueError, TypeError), match=PFA) as ei:
        pfa(Q, K8, V8, **KW_F)
    msg = str(ei.value)
    assert not re.search(r"key_antiquant|value_antiquant|\bantiquant_scale\b", msg), msg
    assert re.search(r"query|deq_scale1", msg), msg


def test_int8_output_ignores_pre_next_without_mask():
    """No mask: pre/next are ignored, so an int8 output with negative values is legal (docs: no band)."""
    out = fia(Q, K, V, **KW_F, quant_scale2=ONE, pre_tokens=-1, next_tokens=-1)[0]
    assert out.dtype == I8
    agree(out, ref_call(FIA, (Q, K, V), dict(KW_F, quant_scale2=ONE, pre_tokens=-1, next_tokens=-1))[0], exact=True)


def test_int8_output_left_padding_ignores_negative_next():
    """With left padding sparse_mode 0 ignores pre/next (docs), so there is no band and an int8 output with
    next_tokens < 0 is legal, as in the reference (found by this file: it used to be refused)."""
    kw = dict(KW_F, actual_seq_lengths_kv=[8, 6], kv_padding_size=torch.tensor([1]),
              atten_mask=torch.zeros(8, S_, dtype=torch.bool), next_tokens=-1, quant_scale2=torch.tensor([2.0]))
    r = ref_call(FIA, (Q, K, V), kw)[0]
    out = fia(Q, K, V, **kw)[0]
    d = (out.to(torch.int32) - r.to(torch.int32)).abs()
    assert d.max() <= 1


# ================================================================================================
# Rows outside every valid query window in quantised calls (run in a child process)
# ================================================================================================
PARTIAL_CASES = ["pfa_full_int8_qlens", "fia_full_int8_tnd_tail", "pfa_int8_out_qlens", "fia_int8_out_tnd_tail",
                 "fia2_int8_out_qlens", "fia_int8_out_f32_qlens"]


def _partial_rows_check(case):
    """Runs in the child: a quantised call whose output has rows outside every valid query window; those rows must
    be 0 and the rest must match the oracles, on every one of several repetitions."""
    for it in range(6):
        if case.startswith(("pfa_full", "fia_full")):
            api, layout = (PFA, "BNSD") if case.startswith("pfa") else (FIA, "TND")
            args, kw = _full_int8_problem(api, layout, 9, 700, partial=True)
            n1, nq1, n2 = _deq_names(api)
            kw.update({n1: torch.tensor([4e-4]), nq1: torch.tensor([127.0]), n2: torch.tensor([2e-4])})
            out = first(OPS[api](*args, **kw))
            r = first(ref_call(api, args, kw))
            exact = _exact_full_int8(api, args, kw, float(torch.tensor(4e-4)), 127.0, float(torch.tensor(2e-4)))
            assert out.dtype == F16 and tuple(out.shape) == tuple(r.shape)
            assert ((out.to(F64) - r.to(F64)).abs() <= _ulp16(r)).all(), f"iteration {it}: differs from the reference"
            zero = (exact == 0).all(-1)
            assert zero.any() and (out[zero] == 0).all(), f"iteration {it}: rows outside the windows are not 0"
        else:
            api = {"pfa": PFA, "fia": FIA, "fia2": FIA2}[case.split("_")[0]]
            layout = "TND" if case.endswith("tnd_tail") else "BSND"
            dtype = F32 if "f32" in case else F16
            args, kw, o, seen, to_layout = _exact_row_problem(api, layout, dtype, 5, 1, 701, partial=True)
            sname, oname = _outq_names(api)
            sc, off = torch.tensor([0.37]), torch.tensor([3.0])
            kw.update({sname: sc, oname: off})
            out = first(OPS[api](*args, **kw))
            exp = to_layout(quant_oracle(o.to(F32), seen, sc, off, None))
            assert torch.equal(first(ref_call(api, args, kw)), exp), "reference != oracle"
            assert torch.equal(out, exp), f"iteration {it}: {int((out != exp).sum())} of {out.numel()} differ"


def _isolated(cases):
    """Runs _partial_rows_check(case) for every case in one child process; prints 'CASE <name> OK' per case."""
    import os
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    code = ("import sys; sys.path.insert(0, %r)\n"
            "import test_infer_quant as T\n"
            "for case in %r:\n"
            "    try:\n"
            "        T._partial_rows_check(case)\n"
            "        print('CASE', case, 'OK', flush=True)\n"
            "    except AssertionError as e:\n"
            "        print('CASE', case, 'FAILED', str(e)[:300].replace(chr(10), ' '), flush=True)\n" % (here, cases))
    # MALLOC_PERTURB_ fills fresh allocations with garbage, so an output row the op does not write is seen;
    # MALLOC_CHECK_ makes glibc abort on heap corruption it detects
    env = dict(os.environ, MALLOC_PERTURB_="165", MALLOC_CHECK_="3")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


def test_partial_rows_float_path_sanity():
    """The same problems without quantisation (float output) pass in process: the construction is right."""
    args, kw, o, seen, to_layout = _exact_row_problem(FIA, "TND", F16, 5, 1, 701, partial=True)
    agree(fia(*args, **kw)[0], to_layout(o.to(F16)), exact=True)
    args, kw, o, seen, to_layout = _exact_row_problem(PFA, "BSND", F32, 5, 1, 701, partial=True)
    agree(pfa(*args, **kw), to_layout(o.to(F32)), exact=True)


@pytest.mark.parametrize("case", PARTIAL_CASES)
def test_quantised_rows_outside_query_windows_are_zero(case, partial_child):
    """Found by this file: the rows outside every query window used to be zeroed with the size of the compute dtype
    instead of the output dtype (int8 query: fp32 vs fp16/int8 output; int8 output: fp16/bf16/fp32 vs int8), writing
    past the output and corrupting the heap.  Run in a child process so that a regression cannot take the test
    session down."""
    res = partial_child
    assert f"CASE {case} OK" in res.stdout.splitlines(), (
        f"child rc {res.returncode}: {res.stdout[-800:]} {res.stderr[-1000:]}")


@pytest.fixture(scope="module")
def partial_child():
    return _isolated(PARTIAL_CASES)


# ================================================================================================
# 6. torch wiring: opcheck of quantised calls, thread-count independence
# ================================================================================================
def op_args(name, **kw):
    """Positional arguments of torch.ops.npufa.<name>.default from keyword arguments (the wrapper's defaults)."""
    import inspect
    sig = inspect.signature(getattr(npufa, name))
    args = []
    for a in getattr(torch.ops.npufa, name).default._schema.arguments:
        args.append(kw.pop(a.name) if a.name in kw else sig.parameters[a.name].default)
    assert not kw, f"unknown arguments {list(kw)}"
    return tuple(args)


def _opcheck_cases():
    c = {}
    B, Nq, Nkv, S, D = 2, 4, 2, 24, 16
    q8, k8, v8 = rint8((B, Nq, 6, D), 81), rint8((B, Nkv, S, D), 82), rint8((B, Nkv, S, D), 83)
    c["pfa_full_int8_int64_scales_int8_out"] = (PFA, dict(
        query=q8, key=k8, value=v8, num_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD",
        deq_scale1=tqp(torch.tensor([4e-4])), quant_scale1=torch.tensor([127.0]), deq_scale2=tqp(torch.tensor([2e-4])),
        quant_scale2=runif((Nq * D,), 1, 3, 84), quant_offset2=runif((Nq * D,), -1, 1, 85), atten_mask=TRIU2048,
        sparse_mode=3, actual_seq_lengths_kv=[S, 11]))
    c["fia_full_int8_fp16_out"] = (FIA, dict(
        query=from_bnsd(q8, "BSH"), key=from_bnsd(k8, "BSH"), value=from_bnsd(v8, "BSH"), num_heads=Nq,
        num_key_value_heads=Nkv, input_layout="BSH", dequant_scale1=torch.tensor([4e-4]),
        quant_scale1=torch.tensor([127.0]), dequant_scale2=torch.tensor([2e-4]), softmax_lse_flag=True))
    (kp, vp), table = make_paged([k8, v8], [S, 9], 8, "BnBsH", seed=86)
    q1 = rnd((B, Nq, 1, D), F16, 87)
    c["ifa_antiquant_paged_int8_out"] = (IFA, dict(
        query=from_bnsd(q1, "BSH"), key=kp, value=vp, num_heads=Nq, num_key_value_heads=Nkv, input_layout="BSH",
        antiquant_scale=runif((2, Nkv * D), 0.01, 0.03, 88, F16), antiquant_offset=rint_off((2, Nkv * D), 89, F16),
        block_table=table, block_size=8, actual_seq_lengths=[S, 9], quant_scale2=torch.tensor([2.0]),
        quant_offset2=torch.tensor([1.0])))
    c["fia_mode3_prefill_lse"] = (FIA, dict(
        query=rnd((B, Nq, 3, D), BF16, 90), key=k8, value=v8, num_heads=Nq, num_key_value_heads=Nkv,
        input_layout="BNSD", key_antiquant_scale=runif((B, Nkv, S), 0.01, 0.03, 91),
        value_antiquant_scale=runif((B, Nkv, S), 0.01, 0.03, 92), key_antiquant_offset=runif((B, Nkv, S), -1, 1, 93),
        value_antiquant_offset=runif((B, Nkv, S), -1, 1, 94), key_antiquant_mode=3, value_antiquant_mode=3,
        softmax_lse_flag=True))
    c["fia_mode4_paged_decode"] = (FIA, dict(
        query=q1, key=kp, value=vp, num_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD",
        key_antiquant_scale=runif((kp.shape[0], 8), 0.01, 0.03, 95),
        value_antiquant_scale=runif((kp.shape[0], 8), 0.01, 0.03, 96), key_antiquant_mode=4, value_antiquant_mode=4,
        block_table=table, block_size=8, actual_seq_lengths_kv=[S, 9]))
    c["fia2_mode5_paged_int8_out"] = (FIA2, dict(
        query=from_bnsd(q1, "BSND"), key=kp, value=vp, num_query_heads=Nq, num_key_value_heads=Nkv,
        input_layout="BSND", dequant_scale_key=runif((kp.shape[0], Nkv, 8), 0.01, 0.03, 97),
        dequant_scale_value=runif((kp.shape[0], Nkv, 8), 0.01, 0.03, 98), key_quant_mode=5, value_quant_mode=5,
        block_table=table, block_size=8, actual_seq_kvlen=[S, 9], quant_scale_out=runif((Nq, D), 1, 2, 99),
        return_softmax_lse=True))
    return c


OPCHECK = _opcheck_cases()


@pytest.mark.parametrize("case", list(OPCHECK))
def test_opcheck_quantised(case):
    name, kw = OPCHECK[case]
    res = torch.library.opcheck(getattr(torch.ops.npufa, name).default, op_args(name, **dict(kw)))
    assert all(v == "SUCCESS" for v in res.values()), res
    # the public wrapper == the raw op, and fake shapes/dtypes == real ones
    a = getattr(npufa, name)(**kw)
    a = a if isinstance(a, tuple) else (a,)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as m:
        fk = {k: (m.from_tensor(v) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        f = getattr(npufa, name)(**fk)
    f = f if isinstance(f, tuple) else (f,)
    for x, y in zip(a, f):
        assert x.dtype == y.dtype and tuple(x.shape) == tuple(y.shape), (x.dtype, y.dtype, x.shape, y.shape)


@pytest.mark.parametrize("offset", [False, True])
def test_opcheck_trans_quant_param(offset):
    s = torch.tensor([0.5, 1e-3, 3.0])
    off = torch.tensor([1.0, -2.0, 300.0]) if offset else None
    res = torch.library.opcheck(torch.ops.npufa.npu_trans_quant_param.default, (s, off, 1))
    assert all(v == "SUCCESS" for v in res.values()), res


@pytest.mark.parametrize("case", ["ifa_channel_offset", "fia2_mode3_paged", "fia_mode1_bsh"])
def test_int8_decode_thread_count_independent(case):
    B, Nq, Nkv, S, D = 3, 8, 2, 1500, 64
    q = rnd((B, Nq, 1, D), F16, 101)
    k8, v8 = rint8((B, Nkv, S, D), 102), rint8((B, Nkv, S, D), 103)
    lens = [S, 700, 1]
    if case == "ifa_channel_offset":
        f = lambda: ifa(q, k8, v8, num_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD",
                        antiquant_scale=runif((2, Nkv, 1, D), 0.01, 0.03, 104, F16),
                        antiquant_offset=runif((2, Nkv, 1, D), -2, 2, 105, F16), actual_seq_lengths=lens,
                        quant_scale2=torch.tensor([20.0]))
    elif case == "fia2_mode3_paged":
        (kp, vp), table = make_paged([k8, v8], lens, 64, "BnNBsD", seed=106)
        f = lambda: fia2(q, kp, vp, num_query_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD",
                         block_table=table, block_size=64, actual_seq_kvlen=lens,
                         dequant_scale_key=runif((B, Nkv, S), 0.01, 0.03, 107),
                         dequant_scale_value=runif((B, Nkv, S), 0.01, 0.03, 108), key_quant_mode=3,
                         value_quant_mode=3, return_softmax_lse=True)
    else:
        f = lambda: fia(from_bnsd(q, "BSH").bfloat16(), from_bnsd(k8, "BSH"), from_bnsd(v8, "BSH"), num_heads=Nq,
                        num_key_value_heads=Nkv, input_layout="BSH", actual_seq_lengths_kv=lens,
                        key_antiquant_scale=runif((Nkv * D,), 0.01, 0.03, 109, BF16),
                        value_antiquant_scale=runif((1, B, S), 0.01, 0.03, 110), key_antiquant_mode=0,
                        value_antiquant_mode=1, softmax_lse_flag=True)
    results = []
    try:
        for nt in (1, 2, 3):
            npufa.set_num_threads(nt)
            results.append(f())
    finally:
        npufa.set_num_threads(None)
    for other in results[1:]:
        for x, y in zip(results[0] if isinstance(results[0], tuple) else (results[0],),
                        other if isinstance(other, tuple) else (other,)):
            assert torch.equal(x, y), "results depend on the thread count"
