#include "kernels/out_quant.h"

#include <cmath>

#include "core/convert.h"

#pragma GCC optimize("fp-contract=off")

namespace npufa {
namespace {

float f16(float x) { return round_to<DType::F16>(x); }

int8_t saturate_rne(float y) {
  const float r = std::nearbyint(y);  // round half to even (default rounding mode)
  return static_cast<int8_t>(r > 127.f ? 127.f : r < -128.f ? -128.f : r);
}

}  // namespace

void quantise_row(const OutQuant& q, int64_t n, int64_t Dv, const float* o, float mul, int8_t* out, int64_t sd) {
  if (q.scale.size() == 1) {  // per tensor: AscendQuant converts every operand to fp16 and computes in fp16
    const float s = f16(q.scale[0]), off = f16(q.offset.empty() ? 0.f : q.offset[0]);
    for (int64_t d = 0; d < Dv; ++d) out[d * sd] = saturate_rne(f16(f16(f16(o[d] * mul) * s) + off));
    return;
  }
  const float* s = q.scale.data() + n * Dv;  // per channel c = n·Dv + d: fp32 multiply, add, then fp16
  const float* off = q.offset.empty() ? nullptr : q.offset.data() + n * Dv;
  for (int64_t d = 0; d < Dv; ++d) {
    const float x = o[d] * mul;
    const float m = x * s[d];
    out[d * sd] = saturate_rne(f16(off ? m + off[d] : m));
  }
}

}  // namespace npufa
