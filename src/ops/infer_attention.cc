// PFA / IFA / FIA v1 / FIA v2: Params -> validate/canonicalise -> flash kernel (decode or prefill).
#include "npufa/ops/infer_attention.h"

#include <algorithm>
#include <cfloat>
#include <cstring>

#include "kernels/flash_fwd.h"
#include "npufa/parallel.h"
#include "problem/infer_attention.h"

namespace npufa {

InferAttentionShapes infer_attention_output_shapes(const InferAttentionParams& p) {
  return canonicalize_infer_attention(p, false).shapes;
}

void infer_attention(const InferAttentionParams& p) {
  const InferCanon c = canonicalize_infer_attention(p, true);
  const AttnProblem& pr = c.problem;
  // Rows outside every valid query window: output 0, lse -FLT_MAX (decision 12, docs/inference.md).
  if (c.partial_rows) {
    const int esz = dtype_size(pr.out_dtype);  // int8 / fp16 outputs of quantised calls differ from the compute dtype
    char* o = static_cast<char*>(pr.out.base);
    parallel_for(c.fill_B * pr.Nq, [&](int64_t it, int) {
      const int64_t b = it / pr.Nq, n = it % pr.Nq;
      for (int64_t s = 0; s < c.fill_S; ++s) {
        for (int64_t d = 0; d < pr.Dv; ++d) std::memset(o + pr.out.at(b, n, s, d) * esz, 0, static_cast<size_t>(esz));
        if (pr.lse.base) static_cast<float*>(pr.lse.base)[pr.lse.at(b, n, s, 0)] = -FLT_MAX;
      }
    });
  }
  int64_t max_q = 0;
  for (const SeqSpan& s : pr.seqs) max_q = std::max(max_q, s.q_len);
  if (max_q == 0) return;
  if (max_q <= kDecodeMaxRows)
    flash_decode(pr);
  else
    flash_forward(pr);
}

}  // namespace npufa
