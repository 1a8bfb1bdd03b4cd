#pragma once
#include "problem/attn_problem.h"

namespace npufa {

// Flash forward over a canonical problem: tiles of Q against tiles of K/V with an online softmax,
// parallel over (batch, head, query tile). Writes out, softmax max/sum (8 copies) for every row of
// every batch; rows outside the batches are the caller's business.
void flash_forward(const AttnProblem& p);

}  // namespace npufa
