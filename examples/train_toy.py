"""Train a tiny transformer with npufa's attention and, from the same init and data, with the float64
reference attention; print both loss curves side by side.

Model: token + position embeddings (dim 32), 2 pre-norm blocks (2 heads of 16, causal attention through
npu_fusion_attention in BSH layout with torch_npu's compressed causal mask, MLP 4x), tied output head.

Tasks (sequences of 16 inputs, vocabulary 20):
* ``pattern`` (default): windows of a fixed random periodic pattern of 12 tokens (with repeated tokens,
  so the next token depends on more than the current one), starting at a random phase; next-token
  prediction at every position.
* ``copy``: 8 random tokens, a separator, then the same tokens again; next-token prediction over the
  copied half (only possible by attending back).  Its learning transition is chaotic: two fp32
  implementations of the same attention (even torch's own SDPA vs a float64 one) drift apart by
  ~1e-2 in loss there at lr 1e-2, so compare curves on it with a small lr (3e-3) or few steps.

    python examples/train_toy.py [--steps 60] [--task pattern|copy] [--lr 1e-2]
"""
from __future__ import annotations

import argparse
import math

import torch
from torch import nn

import npufa
from npufa import reference

VOCAB = 20  # tokens 0..18 are data, 19 is the separator
SEP = VOCAB - 1
SEQ = 16
HALF = 8
DIM = 32
HEADS = 2
LAYERS = 2
CAUSAL = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)


def npufa_attention(q, k, v, heads):
    """q, k, v [B, S, H] -> [B, S, H], causal (sparse_mode 2 with the compressed mask)."""
    d = q.shape[-1] // heads
    return npufa.npu_fusion_attention(q, k, v, heads, "BSH", atten_mask=CAUSAL, sparse_mode=2,
                                      scale=1.0 / math.sqrt(d))[0]


def reference_attention(q, k, v, heads):
    """The same call on npufa.reference in float64, cast back to float32 (differentiable end to end)."""
    d = q.shape[-1] // heads
    out = reference.npu_fusion_attention(q.double(), k.double(), v.double(), heads, "BSH", atten_mask=CAUSAL,
                                         sparse_mode=2, scale=1.0 / math.sqrt(d))[0]
    return out.to(q.dtype)


ATTENTION = {"npufa": npufa_attention, "reference": reference_attention}


class Block(nn.Module):
    def __init__(self, attention):
        super().__init__()
        self.attention = attention
        self.ln1 = nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.ln2 = nn.LayerNorm(DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

    def forward(self, x):
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        x = x + self.proj(self.attention(q.contiguous(), k.contiguous(), v.contiguous(), HEADS))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    def __init__(self, attention):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(torch.randn(SEQ, DIM) * 0.02)
        self.blocks = nn.ModuleList([Block(attention) for _ in range(LAYERS)])
        self.ln = nn.LayerNorm(DIM)
        for m in self.modules():  # GPT-style small init
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, idx):
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.ln(x) @ self.tok.weight.t()


PATTERN_LEN = 12


def pattern_table(seed=123):
    """The fixed periodic pattern (12 random data tokens; repeats make the task context dependent)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, SEP, (PATTERN_LEN,), generator=g)


def pattern_batch(batch, generator, pattern):
    """[batch, 17] windows of the periodic pattern at random phases (16 inputs + 16 targets)."""
    start = torch.randint(0, len(pattern), (batch, 1), generator=generator)
    return pattern[(start + torch.arange(SEQ + 1)) % len(pattern)]


def copy_batch(batch, generator):
    """[batch, 17] sequences: 8 data tokens, SEP, the 8 data tokens again."""
    data = torch.randint(0, SEP, (batch, HALF), generator=generator)
    sep = torch.full((batch, 1), SEP, dtype=torch.long)
    return torch.cat([data, sep, data], dim=1)


def loss_fn(model, seq, task):
    logits = model(seq[:, :-1])
    if task == "copy":  # only the copied half is predictable: predict tokens 9..16 from positions 8..15
        logits, target = logits[:, HALF:], seq[:, HALF + 1:]
    else:
        target = seq[:, 1:]
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))


def train(attention: str = "npufa", steps: int = 60, batch: int = 32, lr: float = 1e-2, seed: int = 0,
          task: str = "pattern"):
    """Train from a fixed init on a fixed data stream; returns the per-step training losses."""
    if task not in ("pattern", "copy"):
        raise ValueError(f"task must be 'pattern' or 'copy', got {task!r}")
    torch.manual_seed(seed)
    model = TinyTransformer(ATTENTION[attention])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    data_gen = torch.Generator().manual_seed(seed + 1)
    pattern = pattern_table()
    losses = []
    for _ in range(steps):
        seq = pattern_batch(batch, data_gen, pattern) if task == "pattern" else copy_batch(batch, data_gen)
        loss = loss_fn(model, seq, task)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main():
    parser = argparse.ArgumentParser(description="npufa vs reference attention: loss curves of a tiny transformer")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--task", choices=("pattern", "copy"), default="pattern")
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args()
    a = train("npufa", args.steps, lr=args.lr, task=args.task)
    b = train("reference", args.steps, lr=args.lr, task=args.task)
    print(f"{'step':>4} {'npufa':>10} {'reference':>10} {'|diff|':>10}")
    for i, (x, y) in enumerate(zip(a, b)):
        print(f"{i:4d} {x:10.6f} {y:10.6f} {abs(x - y):10.2e}")
    print(f"max |diff| = {max(abs(x - y) for x, y in zip(a, b)):.2e}; npufa loss {a[0]:.3f} -> {a[-1]:.3f}, "
          f"reference {b[0]:.3f} -> {b[-1]:.3f} (uniform guess: ln({VOCAB}) = {math.log(VOCAB):.3f})")


if __name__ == "__main__":
    main()
