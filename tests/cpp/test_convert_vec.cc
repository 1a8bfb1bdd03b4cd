// The vectorised conversions and reductions of kernels/vec.h against the scalar ones of
// core/convert.h (exhaustive over every 16-bit pattern where that is possible).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "core/convert.h"
#include "kernels/decode_dot.h"
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

#if NPUFA_DOT_BUILTINS
__attribute__((target("arch=x86-64-v4"), noinline)) void exp_fast16(const float* x, float* y) {
  vec::store(y, tile::dot::exp_fast(vec::load(x)));
}

// The dot level's exp: within 4e-7 of exp (relative) over the softmax's range, exactly 1 at 0, and 0
// below -87.33654 and at -inf like vec::exp (P then has no subnormals).
TEST(VecExp, FastExpOfTheDotLevel) {
  if (!__builtin_cpu_supports("avx512f")) GTEST_SKIP() << "no AVX-512 on this CPU";
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-87.3f, 0.f);
  float x[16], y[16];
  double worst = 0.;
  for (int it = 0; it < 20000; ++it) {
    for (float& v : x) v = it < 10 ? -static_cast<float>(it) * 0.5f : u(rng);
    exp_fast16(x, y);
    for (int i = 0; i < 16; ++i) worst = std::max(worst, std::abs(y[i] / std::exp(static_cast<double>(x[i])) - 1.));
  }
  EXPECT_LT(worst, 4e-7);
  const float edge[16] = {0.f, -0.f, -INFINITY, -87.34f, -88.f, -1000.f, -87.33f, -1e-30f,
                          -0.5f, -0.34657359f, -0.34657360f, -1.f, -2.f, -10.f, -20.f, -40.f};
  exp_fast16(edge, y);
  EXPECT_EQ(y[0], 1.f);
  EXPECT_EQ(y[1], 1.f);
  EXPECT_EQ(y[2], 0.f);
  EXPECT_EQ(y[3], 0.f);
  EXPECT_EQ(y[4], 0.f);
  EXPECT_EQ(y[5], 0.f);
  EXPECT_GE(y[6], 0x1p-126f);  // the smallest kept value is normal
  EXPECT_EQ(y[7], 1.f);
  for (int i = 8; i < 16; ++i) EXPECT_NEAR(y[i] / std::exp(static_cast<double>(edge[i])), 1., 4e-7) << edge[i];
}
#endif

}  // namespace
}  // namespace npufa
