// Pieces of the decode kernel's dot-product level (kernels/decode_dot.h) and of its tile set-up
// against the general code they stand in for, bit for bit: the softmax's rounding and int16 packing,
// Q·K compiled for a fixed head size, and the K/V row pointers of a tile from one block-table lookup.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <iterator>
#include <random>
#include <vector>

#include "core/convert.h"
#include "kernels/decode_dot.h"
#include "kernels/tile_common.h"
#include "kernels/vec.h"

namespace npufa {
namespace {

using tile::kv_rows;
using tile::St;

// ------------------------------------------------------------------------------------------------
// kv_rows2 == kv_rows of K and kv_rows of V (any ISA)
// ------------------------------------------------------------------------------------------------
// A paged source of nb blocks of bs rows and N heads of width w; bnsd: (nb, N, bs, w), else (nb, bs, N·w).
Acc4 paged(const std::vector<int32_t>& table, int64_t per, int64_t bs, int64_t N, int64_t w, bool bnsd, void* base) {
  Acc4 a;
  a.base = base;
  a.table = table.data();
  a.tsb = per;
  a.bs = bs;
  a.bs_shift = (bs & (bs - 1)) == 0 ? __builtin_ctzll(static_cast<unsigned long long>(bs)) : -1;
  a.sblk = N * bs * w;
  a.sn = bnsd ? bs * w : w;
  a.ss = bnsd ? w : N * w;
  return a;
}

void expect_same_rows(const Acc4& k, const Acc4& v, int64_t B, int64_t N, int64_t len) {
  using P = const St<DType::I8>*;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t s0 = k.pbase ? -k.plen : 0; s0 < len; s0 += 13) {
        const int64_t count = std::min<int64_t>(64, len - s0);
        P k1[64], v1[64], k2[64], v2[64];
        kv_rows<DType::I8>(k, b, n, s0, count, k1);
        kv_rows<DType::I8>(v, b, n, s0, count, v1);
        tile::kv_rows2<DType::I8>(k, v, b, n, s0, count, k2, v2);
        for (int64_t c = 0; c < count; ++c) {
          ASSERT_EQ(k1[c], k2[c]) << "b " << b << " n " << n << " s " << s0 + c;
          ASSERT_EQ(v1[c], v2[c]) << "b " << b << " n " << n << " s " << s0 + c;
        }
      }
}

TEST(DecodeTile, RowPointersOfKAndVFromOneLookup) {
  const int64_t B = 2, N = 3, L = 150;
  for (const int64_t bs : {1, 5, 16, 128}) {
    const int64_t per = (L + bs - 1) / bs, nb = B * per;
    std::vector<int32_t> table(static_cast<size_t>(nb));
    for (int64_t i = 0; i < nb; ++i) table[static_cast<size_t>(i)] = static_cast<int32_t>((i * 7 + 3) % nb);
    std::vector<int8_t> kc(static_cast<size_t>(nb * bs * N * 128)), vc(kc.size());
    // shared path: same table and block size, V of another width and layout than K
    for (const bool v_bnsd : {true, false})
      expect_same_rows(paged(table, per, bs, N, 128, true, kc.data()), paged(table, per, bs, N, 64, v_bnsd, vc.data()),
                       B, N, L);
    // the fallbacks: another block size for V, a shared prefix, dense sources
    if (bs > 1 && per % 2 == 0)
      expect_same_rows(paged(table, per, bs, N, 128, true, kc.data()),
                       paged(table, per / 2, bs * 2, N, 128, true, vc.data()), B, N, L);
    Acc4 k = paged(table, per, bs, N, 128, true, kc.data()), v = paged(table, per, bs, N, 128, true, vc.data());
    k.pbase = v.pbase = kc.data();
    k.plen = v.plen = 20;
    k.pss = v.pss = N * 128;
    k.psn = v.psn = 128;
    expect_same_rows(k, v, B, N, L);
  }
  Acc4 k, v;
  k.sb = v.sb = N * L * 128;
  k.sn = v.sn = L * 128;
  k.ss = v.ss = 128;
  std::vector<int8_t> dense(static_cast<size_t>(B * N * L * 128));
  k.base = v.base = dense.data();
  expect_same_rows(k, v, B, N, L);
}

#if NPUFA_DOT_BUILTINS
using tile::dot::v16s;
using tile::dot::v32s;
using vec::vf;

bool dot_level() {
  return __builtin_cpu_supports("x86-64-v4") && __builtin_cpu_supports("avx512bf16") &&
         __builtin_cpu_supports("avx512vnni");
}

// ------------------------------------------------------------------------------------------------
// the softmax's rounding and packing
// ------------------------------------------------------------------------------------------------
#define DOT_TARGET __attribute__((target("arch=x86-64-v4,avx512bf16,avx512vnni"), noinline))

// bf16 words of (a, b) straight to int16 (the kernel's path) and through fp32 (int16x32).
DOT_TARGET void pack_both(const float* a, const float* b, float mul, short* fast, short* slow, float* sums) {
  const vf ea = vec::load(a), eb = vec::load(b);
  vf s1 = {}, s2 = {};
  const v32s h = tile::dot::words_scaled(__builtin_ia32_cvtne2ps2bf16_v32hi(eb, ea), mul, s1);
  const vf ra = vec::round_bf16(ea), rb = vec::round_bf16(eb);
  s2 += ra + rb;
  const v32s g = tile::dot::int16x32(ra, rb, mul);
  std::memcpy(fast, &h, sizeof h);
  std::memcpy(slow, &g, sizeof g);
  sums[0] = vec::hsum(s1);
  sums[1] = vec::hsum(s2);
}

DOT_TARGET void round_f16_both(const float* x, float* hw, float* sw) {
  vec::store(hw, tile::dot::round_f16_hw(vec::load(x)));
  vec::store(sw, vec::round_f16(vec::load(x)));
}

// Probabilities in [0, 1]: random, tiny (fp16 subnormals, bf16 values far below the row's largest),
// exact halves of the int16 step and the ends.
std::vector<float> probabilities(std::mt19937& rng, int n) {
  std::uniform_real_distribution<float> u(0.f, 1.f), e(-30.f, 0.f);
  std::vector<float> p(static_cast<size_t>(n));
  const float edge[] = {0.f, 1.f, 0x1p-14f, 0x1p-15f, 0x1.8p-15f, 0x1p-24f, 0x1p-25f, 0x1.8p-24f, 6.1e-5f, 3e-8f,
                        0.5f + 0x1p-15f, 0.99999994f};
  for (int i = 0; i < n; ++i)
    p[static_cast<size_t>(i)] = i < static_cast<int>(std::size(edge)) ? edge[i] : i % 3 ? u(rng) : std::exp2(e(rng));
  return p;
}

TEST(DecodeDot, SoftmaxWordsStraightFromBf16) {
  if (!dot_level()) GTEST_SKIP() << "no AVX512_BF16 / AVX512_VNNI on this CPU";
  std::mt19937 rng(3);
  for (int it = 0; it < 2000; ++it) {
    const std::vector<float> p = probabilities(rng, 32);
    const float mul = std::ldexp(1.f, 14 + it % 4);  // 2^14 / σ, the row's largest p at or below σ
    const float scale = std::ldexp(1.f, -(it % 4));
    float a[16], b[16];
    for (int i = 0; i < 16; ++i) a[i] = p[static_cast<size_t>(i)] * scale, b[i] = p[static_cast<size_t>(16 + i)] * scale;
    short fast[32], slow[32];
    float sums[2];
    pack_both(a, b, mul, fast, slow, sums);
    for (int i = 0; i < 32; ++i) ASSERT_EQ(fast[i], slow[i]) << "word " << i << " p " << (i < 16 ? a[i] : b[i - 16]);
    EXPECT_NEAR(sums[0], sums[1], 1e-6f * sums[1]);
  }
}

TEST(DecodeDot, Fp16RoundingOnTheConversions) {
  if (!dot_level()) GTEST_SKIP() << "no AVX512_BF16 / AVX512_VNNI on this CPU";
  std::mt19937 rng(4);
  for (int it = 0; it < 4000; ++it) {
    const std::vector<float> p = probabilities(rng, 16);
    float hw[16], sw[16];
    round_f16_both(p.data(), hw, sw);
    for (int i = 0; i < 16; ++i) ASSERT_EQ(f32_to_bits(hw[i]), f32_to_bits(sw[i])) << p[static_cast<size_t>(i)];
  }
}

// ------------------------------------------------------------------------------------------------
// Q·K compiled for a head size == Q·K with the size at run time
// ------------------------------------------------------------------------------------------------
template <DType KT, int DC>
DOT_TARGET void qk_run(const short* q16, int64_t D, const St<KT>* const* k, int64_t R, int64_t cols, float* S,
                       const tile::dot::RowAffine* aff) {
  const St<DType::BF16>* const* none = nullptr;
  tile::dot::qk<KT, DType::BF16, DC>(q16, D, D, 0, k, none, R, cols, 0.125f, S, aff, k, 0);
}

template <DType KT, int D>
void expect_qk_same() {
  std::mt19937 rng(D);
  std::uniform_int_distribution<int> qi(-16000, 16000), ki(-128, 127);
  std::normal_distribution<float> nf(0.f, 1.f);
  constexpr int64_t R = 16, keys = 64;
  std::vector<short> q16(static_cast<size_t>(R * D));
  std::vector<St<KT>> kd(static_cast<size_t>(keys * D));
  for (auto& x : q16) x = static_cast<short>(KT == DType::I8 ? qi(rng) : f32_to_bf16(nf(rng)));
  for (auto& x : kd)
    if constexpr (KT == DType::I8)
      x = static_cast<int8_t>(ki(rng));
    else
      x = f32_to_bf16(nf(rng));
  tile::dot::RowAffine aff;
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 16; ++j) aff.scale[i][j] = 1e-4f * static_cast<float>(1 + i + j), aff.bias[i][j] = 0.5f * j;
  for (const int64_t cols : {int64_t{64}, int64_t{7}}) {
    const St<KT>* k[tile::kBk];
    for (int64_t c = 0; c < tile::kBk; ++c)
      k[c] = c < cols ? kd.data() + c * D : reinterpret_cast<const St<KT>*>(tile::dot::kZeroRow);
    for (const int64_t rows : {int64_t{4}, R}) {
      std::vector<float> s1(static_cast<size_t>(R * tile::kBk), 0.f), s2 = s1;
      qk_run<KT, D>(q16.data(), D, k, rows, (cols + 3) / 4 * 4, s1.data(), &aff);
      qk_run<KT, 0>(q16.data(), D, k, rows, (cols + 3) / 4 * 4, s2.data(), &aff);
      for (size_t i = 0; i < s1.size(); ++i) ASSERT_EQ(f32_to_bits(s1[i]), f32_to_bits(s2[i])) << "D " << D << " at " << i;
    }
  }
}

TEST(DecodeDot, QkForAFixedHeadSize) {
  if (!dot_level()) GTEST_SKIP() << "no AVX512_BF16 / AVX512_VNNI on this CPU";
  expect_qk_same<DType::I8, 64>();
  expect_qk_same<DType::I8, 128>();
  expect_qk_same<DType::I8, 256>();
  expect_qk_same<DType::BF16, 64>();
  expect_qk_same<DType::BF16, 128>();
  expect_qk_same<DType::BF16, 256>();
}
#endif

}  // namespace
}  // namespace npufa
