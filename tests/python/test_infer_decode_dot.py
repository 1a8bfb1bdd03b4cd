"""The decode kernel's dot-product level (src/kernels/decode_dot.h: vdpbf16ps for bf16 K/V, vpdpwssd for int8
K/V) against the float64 reference, and against the AVX-512 path without it (NPUFA_ISA=avx512, in a child
process: the level is chosen once per process).

The level runs when the head widths are whole 32-element chunks and a decode item holds at most 16 rows (GQA group
x query rows): bf16 K/V (rope part included), or int8 K/V with per-channel / per-tensor antiquant. These grids pick
exactly those shapes (the general grids mostly use other widths), around the tile edges (odd key counts, partial
blocks of 4 keys) and with every decode feature: paged KV (block sizes 1, 5, 16, 128), masks, pse, left padding,
shared prefix, lse. Tolerances: infer_helpers.check_out (3 x the rounding of the exact result).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import npufa
from infer_helpers import BF16, F16, F64, FIA, IFA, agree, cfg_id, check_out, rnd, sample_grid
from test_infer_quant import AQ_FACTORS, AQ_FORMS, aq_valid, run_antiquant
from test_infer_reference_grid import FIA_FACTORS, IFA_FACTORS, run_fia, run_ifa

DOT_DIMS = [(32, 32), (64, 64), (96, 96), (128, 128), (256, 256)]
S_DOT = [1, 3, 5, 63, 64, 65, 130, 257]  # keys: odd counts, partial blocks of 4, more than one tile

IFA_DOT = dict(IFA_FACTORS, dtype=[BF16], dims=DOT_DIMS, gqa=[1, 2, 4, 7, 16], Skv=S_DOT)
FIA_DOT = dict(FIA_FACTORS, dtype=[BF16], dims=DOT_DIMS + [(128, 64), (64, 32)], gqa=[1, 4, 7, 16], Sq=[1, 2, 3],
               Skv=S_DOT)


@pytest.mark.parametrize("cfg", sample_grid(IFA_DOT, 60, 71), ids=cfg_id)
def test_ifa_bf16_dot(cfg):
    run_ifa(cfg, 7100 + sum(map(ord, cfg_id(cfg))) % 997)


@pytest.mark.parametrize("cfg", sample_grid(FIA_DOT, 80, 72), ids=cfg_id)
def test_fia_bf16_dot(cfg):
    run_fia(cfg, 7200 + sum(map(ord, cfg_id(cfg))) % 997)


def _aq_dot_cases(n, seed):
    fac = dict(AQ_FACTORS, Sq=[1, 2], D=[32, 64, 128, 96], Skv=[5, 63, 70, 130])
    return [c for c in sample_grid(fac, n, seed) if aq_valid(c)]


@pytest.mark.parametrize("cfg", _aq_dot_cases(120, 73), ids=cfg_id)
def test_int8_kv_dot(cfg):
    """int8 K/V: the reference on the int8 call, the fp32 path on K/V dequantised by hand, and (power-of-two
    scales) the query-dtype path on exactly dequantised K/V (run_antiquant)."""
    run_antiquant(cfg, 7300 + sum(map(ord, cfg_id(cfg))) % 997)


def test_int8_kv_dot_covers_every_form():
    forms = {c["form"] for c in _aq_dot_cases(120, 73)}
    assert forms == set(AQ_FORMS), set(AQ_FORMS) - forms


# ------------------------------------------------------------------------------------------------
# the dot level == the AVX-512 level without it
# ------------------------------------------------------------------------------------------------
def _problems():
    """(name, op, args, kw): decode problems the dot level takes (bf16, int8 per channel with offsets, int8 per
    tensor), with a long paged cache, GQA 4 and 7, lse."""
    out = []
    g = torch.Generator().manual_seed(5)
    for name, B, Nq, Nkv, D, L, bs in (("gqa4", 2, 8, 2, 128, 1000, 16), ("gqa7", 1, 7, 1, 64, 333, 128)):
        q = rnd((B, Nq, 1, D), BF16, 11)
        nb = B * ((L + bs - 1) // bs)
        table = torch.randperm(nb, generator=g).view(B, -1).to(torch.int32)
        kw = dict(num_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD", block_table=table, block_size=bs,
                  actual_seq_lengths_kv=[L, L // 3][:B], softmax_lse_flag=True)
        kc, vc = rnd((nb, Nkv, bs, D), BF16, 12), rnd((nb, Nkv, bs, D), BF16, 13)
        out.append((f"{name}-bf16", (q, kc, vc), dict(kw)))
        k8 = torch.randint(-128, 128, (nb, Nkv, bs, D), generator=g, dtype=torch.int8)
        v8 = torch.randint(-128, 128, (nb, Nkv, bs, D), generator=g, dtype=torch.int8)
        ch = dict(key_antiquant_scale=(torch.rand(Nkv, 1, D, generator=g) * 0.05).to(BF16),
                  value_antiquant_scale=(torch.rand(Nkv, 1, D, generator=g) * 0.05).to(BF16),
                  key_antiquant_offset=torch.randn(Nkv, 1, D, generator=g).to(BF16),
                  value_antiquant_offset=torch.randn(Nkv, 1, D, generator=g).to(BF16))
        out.append((f"{name}-int8-channel", (q, k8, v8), dict(kw, **ch)))
        out.append((f"{name}-int8-tensor-fp16q", (q.to(F16), k8, v8),
                    dict(kw, antiquant_scale=torch.tensor([0.02, 0.03], dtype=F16),
                         antiquant_offset=torch.tensor([1.0, -2.0], dtype=F16))))
    return out


_CHILD = """
import sys, torch, npufa
sys.path.insert(0, {tests!r})
from test_infer_decode_dot import _problems
res = {{}}
for name, args, kw in _problems():
    out, lse = npufa.npu_fused_infer_attention_score(*args, **kw)
    res[name] = (out, lse)
torch.save(res, {path!r})
"""


def test_dot_level_equals_avx512_level(tmp_path):
    path = str(tmp_path / "avx512.pt")
    env = dict(os.environ, NPUFA_ISA="avx512")
    code = _CHILD.format(tests=os.path.dirname(__file__), path=path)
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    other = torch.load(path)
    for name, args, kw in _problems():
        out, lse = npufa.npu_fused_infer_attention_score(*args, **kw)
        o2, l2 = other[name]
        agree(out, o2, ulps=4.0)
        torch.testing.assert_close(lse, l2, rtol=1e-4, atol=1e-4)


def test_int8_kv_one_visible_key_is_exact():
    """A row that sees one key (the others masked) is exactly that key's dequantised V row: the int16 P of the
    dot level keeps p = 1 exact (power-of-two scale), as the float path does."""
    B, Nq, Nkv, D, L = 1, 4, 1, 64, 70
    g = torch.Generator().manual_seed(9)
    q = rnd((B, Nq, 1, D), BF16, 1)
    k8 = torch.randint(-128, 128, (B, Nkv, L, D), generator=g, dtype=torch.int8)
    v8 = torch.randint(-128, 128, (B, Nkv, L, D), generator=g, dtype=torch.int8)
    scale = torch.full((Nkv, 1, D), 0.125, dtype=BF16)
    offset = torch.full((Nkv, 1, D), 2.0, dtype=BF16)
    mask = torch.ones(B, 1, 1, L, dtype=torch.bool)
    mask[..., 37] = False  # only key 37 is visible
    out, _ = npufa.npu_fused_infer_attention_score(
        q, k8, v8, num_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD", atten_mask=mask,
        key_antiquant_scale=scale, value_antiquant_scale=scale, key_antiquant_offset=offset,
        value_antiquant_offset=offset)
    want = ((v8[0, 0, 37].to(F64) + 2.0) * 0.125).to(BF16)
    assert torch.equal(out[0, :, 0], want.expand(Nq, D))
    # negative control: a different visible key gives a different row
    assert not torch.equal(want, ((v8[0, 0, 36].to(F64) + 2.0) * 0.125).to(BF16))


def test_decode_buffers_kept_between_calls_carry_no_state():
    """Decode keeps its partials and per-thread scratch from call to call: a call gives the same bits before
    and after calls of other shapes (bigger and smaller groups, widths, batches; bf16 and int8 K/V)."""
    def decode(B, Nq, Nkv, D, L, int8, seed):
        g = torch.Generator().manual_seed(seed)
        q = rnd((B, Nq, 1, D), BF16, seed)
        kw = {}
        if int8:
            k = torch.randint(-128, 128, (B, Nkv, L, D), generator=g, dtype=torch.int8)
            v = torch.randint(-128, 128, (B, Nkv, L, D), generator=g, dtype=torch.int8)
            s = torch.rand(Nkv, 1, D, generator=g).to(BF16) * 0.1
            kw = dict(key_antiquant_scale=s, value_antiquant_scale=s, key_antiquant_offset=s,
                      value_antiquant_offset=s)
        else:
            k, v = rnd((B, Nkv, L, D), BF16, seed + 1), rnd((B, Nkv, L, D), BF16, seed + 2)
        return npufa.npu_fused_infer_attention_score(q, k, v, num_heads=Nq, num_key_value_heads=Nkv,
                                                     input_layout="BNSD", **kw)[0]

    cases = [(2, 8, 2, 64, 300, True, 1), (1, 4, 1, 128, 70, False, 2), (4, 32, 2, 256, 1000, True, 3),
             (1, 16, 16, 32, 5, False, 4), (3, 7, 1, 96, 129, True, 5)]
    first = [decode(*c) for c in cases]
    again = [decode(*c) for c in reversed(cases)][::-1]
    for c, a, b in zip(cases, first, again):
        assert torch.equal(a, b), c
