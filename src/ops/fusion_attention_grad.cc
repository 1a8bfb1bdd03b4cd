// npu_fusion_attention_grad: Params -> validate/canonicalise -> flash backward.
#include "npufa/ops/fusion_attention_grad.h"

#include <cstring>
#include <vector>

#include "core/convert.h"
#include "kernels/flash_bwd.h"
#include "problem/fusion_attention.h"

namespace npufa {
namespace {

// Zeroes rows [from, T) of a TND tensor (rows that belong to no batch, decision 12).
void zero_tail_rows(const TensorView& t, int64_t from) {
  const int64_t esz = dtype_size(t.dtype);
  for (int64_t r = from; r < t.size(0); ++r)
    for (int64_t n = 0; n < t.size(1); ++n)
      for (int64_t d = 0; d < t.size(2); ++d)
        std::memset(static_cast<char*>(t.data) + (r * t.stride(0) + n * t.stride(1) + d * t.stride(2)) * esz, 0,
                    static_cast<size_t>(esz));
}

}  // namespace

void fusion_attention_grad(const FusionAttentionGradParams& g) {
  FusionAttentionGradCanon gc = canonicalize_fusion_attention_grad(g);
  const AttnProblem& pr = gc.fwd.problem;
  std::vector<float> dpse;
  if (gc.io.dpse_numel > 0) {
    dpse.assign(static_cast<size_t>(gc.io.dpse_numel), 0.f);
    gc.io.dpse = dpse.data();
  }
  if (gc.fwd.layout == Layout::TND) {
    zero_tail_rows(g.dq, gc.fwd.rows_covered);
    zero_tail_rows(g.dk, gc.fwd.kv_rows_covered);
    zero_tail_rows(g.dv, gc.fwd.kv_rows_covered);
  }
  flash_backward(pr, gc.io);
  if (gc.io.dpse) {
    void* out = g.dpse->data;
    const int64_t n = gc.io.dpse_numel;
    switch (g.dpse->dtype) {
      case DType::F32: std::memcpy(out, dpse.data(), static_cast<size_t>(n) * 4); break;
      case DType::F16: for (int64_t e = 0; e < n; ++e) static_cast<uint16_t*>(out)[e] = f32_to_f16(dpse[static_cast<size_t>(e)]); break;
      case DType::BF16: for (int64_t e = 0; e < n; ++e) static_cast<uint16_t*>(out)[e] = f32_to_bf16(dpse[static_cast<size_t>(e)]); break;
      default: break;
    }
  }
}

}  // namespace npufa
