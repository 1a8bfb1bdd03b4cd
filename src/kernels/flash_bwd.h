#pragma once
#include "problem/attn_problem.h"

namespace npufa {

// What the backward reads and writes beyond the forward problem. The problem's smax/ssum
// accessors are read as inputs (the forward's softmax statistics).
struct BwdIO {
  Acc4 dy, o;         // dY and the forward output (attention_in), problem dtype, out layout
  Acc4 dq, dk, dv;    // gradients, problem dtype, q/k/v layouts
  Acc4 dq_rope, dk_rope;  // when the problem has rope (Dr > 0)
  float* dpse = nullptr;     // fp32, indexed like the pse tensor (element offsets of PseSpec); or null
  int64_t dpse_numel = 0;    // elements of that index space
  float* dsink = nullptr;    // fp32 [Nq] or null
};

// FlashAttention-2 backward: P recomputed from the saved statistics, O(tile) memory.
// Pass 1 is parallel over (batch, KV head, key tile) and accumulates dK/dV over the GQA group and
// all query tiles; pass 2 is parallel over (batch, query head, query tile) for dQ, dpse and dsink.
// Every row of dq/dk/dv that belongs to a batch is written; rows outside the batches are the
// caller's business.
void flash_backward(const AttnProblem& p, const BwdIO& io);

}  // namespace npufa
