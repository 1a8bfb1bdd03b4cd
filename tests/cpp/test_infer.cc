// The inference ops through the public C++ API: paged == contiguous (bit for bit: the same tiles in
// the same order), FIA prefill == PFA, a decode step against a brute-force double loop, and the
// cache write op feeding a paged decode.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "npufa/error.h"
#include "npufa/ops/infer_attention.h"
#include "test_util.h"

namespace npufa {
namespace {

using test::Tensor;

Tensor randn(DType t, std::vector<int64_t> shape, std::mt19937& rng) {
  Tensor x(t, std::move(shape));
  std::normal_distribution<double> nd;
  for (int64_t i = 0; i < x.numel(); ++i) x.set(i, nd(rng));
  return x;
}

struct DecodeCase {
  int64_t B = 3, Nq = 8, Nkv = 2, D = 64, S = 150, bs = 16;
  bool bnsd_pool = false;
  DType dt = DType::BF16;
};

class PagedDecode : public ::testing::TestWithParam<DecodeCase> {};

TEST_P(PagedDecode, EqualsContiguousBitForBit) {
  const DecodeCase c = GetParam();
  std::mt19937 rng(3);
  const std::vector<int64_t> lens = {c.S, 1, c.S / 2};
  Tensor q = randn(c.dt, {c.B, 1, c.Nq * c.D}, rng);
  Tensor k = randn(c.dt, {c.B, c.S, c.Nkv * c.D}, rng), v = randn(c.dt, {c.B, c.S, c.Nkv * c.D}, rng);
  Tensor out_c(c.dt, {c.B, 1, c.Nq * c.D}), out_p(c.dt, {c.B, 1, c.Nq * c.D});

  InferAttentionParams p;
  p.kind = InferOp::Incre;
  p.op = "npu_incre_flash_attention";
  p.query = q.view();
  p.key = k.view();
  p.value = v.view();
  p.num_heads = c.Nq;
  p.num_key_value_heads = c.Nkv;
  p.scale = 0.125;
  p.actual_seq_lengths_kv = lens;
  p.attention_out = out_c.view();
  infer_attention(p);

  // The same keys scattered over a shuffled block pool.
  const int64_t W = (c.S + c.bs - 1) / c.bs, nb = c.B * W + 3;
  std::vector<int64_t> perm(static_cast<size_t>(nb));
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  Tensor table(DType::I32, {c.B, W});
  const std::vector<int64_t> pool_shape = c.bnsd_pool ? std::vector<int64_t>{nb, c.Nkv, c.bs, c.D}
                                                      : std::vector<int64_t>{nb, c.bs, c.Nkv * c.D};
  Tensor kp(c.dt, pool_shape), vp(c.dt, pool_shape);
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t w = 0; w < W; ++w) table.set(b * W + w, static_cast<double>(perm[static_cast<size_t>(b * W + w)]));
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t s = 0; s < c.S; ++s)
      for (int64_t n = 0; n < c.Nkv; ++n)
        for (int64_t d = 0; d < c.D; ++d) {
          const int64_t blk = perm[static_cast<size_t>(b * W + s / c.bs)], off = s % c.bs;
          const int64_t dst = c.bnsd_pool ? ((blk * c.Nkv + n) * c.bs + off) * c.D + d
                                          : (blk * c.bs + off) * c.Nkv * c.D + n * c.D + d;
          const int64_t src = (b * c.S + s) * c.Nkv * c.D + n * c.D + d;
          kp.set(dst, k.get(src));
          vp.set(dst, v.get(src));
        }
  p.key = kp.view();
  p.value = vp.view();
  p.block_table = table.view();
  p.block_size = c.bs;
  p.input_layout = "BSH";
  p.attention_out = out_p.view();
  infer_attention(p);
  for (int64_t i = 0; i < out_c.numel(); ++i) ASSERT_EQ(out_c.get(i), out_p.get(i)) << i;

  // And against a brute-force double loop (fp32 inputs only: the check is about indexing).
  if (c.dt != DType::F32) return;
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t n = 0; n < c.Nq; ++n) {
      const int64_t nk = n / (c.Nq / c.Nkv), L = lens[static_cast<size_t>(b)];
      std::vector<double> s(static_cast<size_t>(L));
      double mx = -INFINITY, sum = 0;
      for (int64_t j = 0; j < L; ++j) {
        double dot = 0;
        for (int64_t d = 0; d < c.D; ++d)
          dot += q.get(b * c.Nq * c.D + n * c.D + d) * k.get((b * c.S + j) * c.Nkv * c.D + nk * c.D + d);
        s[static_cast<size_t>(j)] = dot * 0.125;
        mx = std::max(mx, dot * 0.125);
      }
      for (double& x : s) sum += (x = std::exp(x - mx));
      for (int64_t d = 0; d < c.D; ++d) {
        double o = 0;
        for (int64_t j = 0; j < L; ++j) o += s[static_cast<size_t>(j)] * v.get((b * c.S + j) * c.Nkv * c.D + nk * c.D + d);
        ASSERT_NEAR(out_c.get(b * c.Nq * c.D + n * c.D + d), o / sum, 2e-5);
      }
    }
}

INSTANTIATE_TEST_SUITE_P(Grid, PagedDecode,
                         ::testing::Values(DecodeCase{}, DecodeCase{3, 8, 2, 64, 150, 1, false, DType::F16},
                                           DecodeCase{3, 8, 2, 64, 150, 5, true, DType::F32},
                                           DecodeCase{3, 7, 7, 40, 70, 16, true, DType::F32},
                                           DecodeCase{3, 12, 3, 128, 300, 128, false, DType::BF16}));

TEST(InferAttention, FusedPrefillEqualsPrompt) {
  std::mt19937 rng(5);
  const int64_t B = 2, N = 4, S = 90, D = 32;
  Tensor q = randn(DType::F16, {B, N, S, D}, rng), k = randn(DType::F16, {B, N, S, D}, rng),
         v = randn(DType::F16, {B, N, S, D}, rng);
  Tensor o1(DType::F16, {B, N, S, D}), o2(DType::F16, {B, N, S, D});
  InferAttentionParams p;
  p.kind = InferOp::Prompt;
  p.op = "npu_prompt_flash_attention";
  p.query = q.view(), p.key = k.view(), p.value = v.view();
  p.num_heads = N, p.input_layout = "BNSD", p.scale = 0.2, p.sparse_mode = 3;
  p.atten_mask = test::triu2048().view();
  p.actual_seq_lengths = std::vector<int64_t>{90, 41};
  p.attention_out = o1.view();
  infer_attention(p);
  p.kind = InferOp::Fused;
  p.op = "npu_fused_infer_attention_score";
  p.attention_out = o2.view();
  infer_attention(p);
  for (int64_t i = 0; i < o1.numel(); ++i) ASSERT_EQ(o1.get(i), o2.get(i)) << i;
  // Rows beyond actual_seq_lengths are zeros.
  for (int64_t n = 0; n < N; ++n)
    for (int64_t s = 41; s < S; ++s)
      for (int64_t d = 0; d < D; ++d) ASSERT_EQ(o1.get(((1 * N + n) * S + s) * D + d), 0.0);
}

TEST(InferAttention, BadBlockIdIsAClearError) {
  std::mt19937 rng(1);
  Tensor q = randn(DType::F32, {1, 1, 16}, rng), kp = randn(DType::F32, {2, 4, 16}, rng), out(DType::F32, {1, 1, 16});
  Tensor table(DType::I32, {1, 2});
  table.set(0, 1);
  table.set(1, 2);  // blocknum is 2
  InferAttentionParams p;
  p.kind = InferOp::Incre;
  p.op = "npu_incre_flash_attention";
  p.query = q.view(), p.key = kp.view(), p.value = kp.view(), p.attention_out = out.view();
  p.block_table = table.view(), p.block_size = 4, p.actual_seq_lengths_kv = std::vector<int64_t>{5};
  try {
    infer_attention(p);
    FAIL() << "no error";
  } catch (const ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("block_table[0][1] = 2"), std::string::npos) << e.what();
  }
  p.actual_seq_lengths_kv = std::vector<int64_t>{4};  // only block 0 (id 1) is read: valid
  EXPECT_NO_THROW(infer_attention(p));
}

TEST(ReshapeAndCache, WritesRowsAtSlots) {
  std::mt19937 rng(2);
  Tensor k = randn(DType::BF16, {3, 2, 16}, rng), v = randn(DType::BF16, {3, 2, 8}, rng);
  Tensor kc(DType::BF16, {2, 4, 2, 16}), vc(DType::BF16, {2, 4, 16});
  Tensor slots(DType::I64, {3});
  slots.set(0, 5), slots.set(1, -1), slots.set(2, 0);
  ReshapeAndCacheParams p;
  p.key = k.view(), p.value = v.view(), p.key_cache = kc.view(), p.value_cache = vc.view(), p.slot_indices = slots.view();
  reshape_and_cache(p);
  for (int64_t x = 0; x < 32; ++x) {
    EXPECT_EQ(kc.get(5 * 32 + x), k.get(x));       // token 0 -> block 1, offset 1
    EXPECT_EQ(kc.get(0 * 32 + x), k.get(64 + x));  // token 2 -> block 0, offset 0
  }
  for (int64_t x = 0; x < 16; ++x) EXPECT_EQ(vc.get(5 * 16 + x), v.get(x));
  for (int64_t x = 0; x < 32; ++x) EXPECT_EQ(kc.get(1 * 32 + x), 0.0);  // untouched
  slots.set(1, 8);
  EXPECT_THROW(reshape_and_cache(p), ValueError);
}

}  // namespace
}  // namespace npufa
