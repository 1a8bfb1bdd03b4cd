// The vectorised conversions and reductions of kernels/vec.h against the scalar ones of
// core/convert.h (exhaustive over every 16-bit pattern where that is possible).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "core/convert.h"
#include "kernels/vec.h"

namespace npufa {
namespace {

bool same_bits_or_nan(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return f32_to_bits(a) == f32_to_bits(b);
}

TEST(VecConvert, WidenEvery16BitPattern) {
  for (uint32_t base = 0; base < 65536; base += 16) {
    uint16_t h[16];
    for (uint32_t i = 0; i < 16; ++i) h[i] = static_cast<uint16_t>(base + i);
    const vec::vf a = vec::f16x16(h), b = vec::bf16x16(h);
    for (int i = 0; i < 16; ++i) {
      ASSERT_TRUE(same_bits_or_nan(a[i], f16_to_f32(h[i]))) << "fp16 bits " << h[i];
      ASSERT_TRUE(same_bits_or_nan(b[i], bf16_to_f32(h[i]))) << "bf16 bits " << h[i];
    }
  }
}

TEST(VecConvert, RoundLikeTheScalarConversions) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> unit(0.f, 1.f);
  std::uniform_int_distribution<int> ex(-40, 17);
  for (int it = 0; it < 20000; ++it) {
    float x[16];
    for (float& v : x) v = std::ldexp(unit(rng), ex(rng));  // probabilities and beyond, fp16 subnormals too
    if (it == 0) x[0] = 0.f, x[1] = 65504.f, x[2] = 65520.f, x[3] = 6.103515625e-05f, x[4] = 2.98e-08f;
    const vec::vf b = vec::round_bf16(vec::load(x)), h = vec::round_f16(vec::load(x));
    for (int i = 0; i < 16; ++i) {
      ASSERT_TRUE(same_bits_or_nan(b[i], round_to<DType::BF16>(x[i]))) << x[i];
      ASSERT_TRUE(same_bits_or_nan(h[i], round_to<DType::F16>(x[i]))) << x[i];
    }
  }
}

TEST(VecReduce, SumAndMax) {
  float x[16];
  for (int i = 0; i < 16; ++i) x[i] = static_cast<float>(i * 3 % 7) - 2.5f;
  float s = 0.f, m = x[0];
  for (float v : x) s += v, m = std::max(m, v);
  EXPECT_FLOAT_EQ(vec::hsum(vec::load(x)), s);
  EXPECT_EQ(vec::hmax(vec::load(x)), m);
  x[9] = -INFINITY;
  x[3] = 40.f;
  EXPECT_EQ(vec::hmax(vec::load(x)), 40.f);
}

}  // namespace
}  // namespace npufa
