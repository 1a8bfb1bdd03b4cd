#pragma once
#include "problem/attn_problem.h"

namespace npufa {

// Flash forward over a canonical problem: tiles of Q against tiles of K/V with an online softmax,
// parallel over (batch, head, query tile). Writes out, softmax max/sum (8 copies) for every row of
// every batch; rows outside the batches are the caller's business.
void flash_forward(const AttnProblem& p);

}  // namespace npufa

namespace npufa {

// Flash-decoding for short query rows (decode, MTP): one work item = (batch, KV head, chunk of
// keys) holding every query row of the KV head's GQA group, so each K/V tile is read once per
// group; the partial (max, sum, out) of the chunks are merged afterwards. Same outputs as
// flash_forward.
void flash_decode(const AttnProblem& p);

// The largest query length flash_decode is meant for.
inline constexpr int64_t kDecodeMaxRows = 16;

}  // namespace npufa
