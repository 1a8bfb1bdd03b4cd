// npu_fusion_attention: Params -> validate/canonicalise -> flash kernel.
#include "npufa/ops/fusion_attention.h"

#include <cstring>

#include "kernels/flash_fwd.h"
#include "problem/fusion_attention.h"

namespace npufa {

FusionAttentionShapes fusion_attention_output_shapes(const FusionAttentionParams& p) {
  return canonicalize_fusion_attention(p, false).shapes;
}

FusionAttentionResult fusion_attention_fwd(const FusionAttentionParams& p) {
  const FusionAttentionCanon c = canonicalize_fusion_attention(p, true);
  const AttnProblem& pr = c.problem;
  // TND rows that belong to no batch are written as zeros (decision 12).
  if (c.layout == Layout::TND) {
    const int64_t T = p.query.size(0), esz = dtype_size(pr.dtype);
    for (int64_t t = c.rows_covered; t < T; ++t)
      for (int64_t n = 0; n < pr.Nq; ++n) {
        char* o = static_cast<char*>(pr.out.base);
        for (int64_t d = 0; d < pr.Dv; ++d) std::memset(o + pr.out.at(0, n, t, d) * esz, 0, static_cast<size_t>(esz));
        for (const Acc4* s : {&pr.smax, &pr.ssum})
          for (int k = 0; k < 8; ++k) static_cast<float*>(s->base)[s->at(0, n, t, k)] = 0.f;
      }
  }
  flash_forward(pr);
  FusionAttentionResult r;
  r.seed = p.seed;
  r.offset = p.offset;
  r.numels = c.numels;
  return r;
}

}  // namespace npufa
