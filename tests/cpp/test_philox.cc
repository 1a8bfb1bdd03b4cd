// Philox4x32-10 known answers (Random123 kat_vectors) and the bit-packed dropout mask (§2.4).
#include <gtest/gtest.h>

#include <array>
#include <vector>

#include "npufa/dropout.h"
#include "npufa/parallel.h"

namespace npufa {
namespace {

using W4 = std::array<uint32_t, 4>;
using K2 = std::array<uint32_t, 2>;

TEST(Philox, Random123KnownAnswers) {
  EXPECT_EQ(philox4x32_10(W4{0, 0, 0, 0}, K2{0, 0}), (W4{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}));
  EXPECT_EQ(philox4x32_10(W4{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, K2{0xffffffffu, 0xffffffffu}),
            (W4{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}));
  EXPECT_EQ(philox4x32_10(W4{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, K2{0xa4093822u, 0x299f31d0u}),
            (W4{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}));
}

// dropout_keep follows its documented definition: element e uses word e % 4 of the block with
// counter {lo(e/4), hi(e/4), lo(offset), hi(offset)} and key {lo(seed), hi(seed)}.
TEST(Philox, DropoutKeepDefinition) {
  const uint64_t seed = 0x0123456789abcdefull, offset = 0xfedcba9876543210ull;
  const double keep_prob = 0.6;
  const double thr = keep_prob * 4294967296.0;  // keep iff word < keep_prob * 2^32
  EXPECT_NEAR(static_cast<double>(dropout_threshold(keep_prob)), thr, 1.0);
  EXPECT_EQ(dropout_threshold(1.0), uint64_t{1} << 32);
  int kept = 0;
  for (uint64_t e : {uint64_t{0}, uint64_t{1}, uint64_t{2}, uint64_t{3}, uint64_t{4}, uint64_t{77},
                     (uint64_t{1} << 34) + 5, (uint64_t{7} << 40) + 2, ~uint64_t{0}}) {
    const uint64_t blk = e / 4;
    const W4 w = philox4x32_10(W4{static_cast<uint32_t>(blk), static_cast<uint32_t>(blk >> 32),
                                  static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)},
                               K2{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)});
    const bool want = static_cast<double>(w[e % 4]) < thr;
    EXPECT_EQ(dropout_keep(seed, offset, keep_prob, e), want) << "element " << e;
    kept += want;
    EXPECT_TRUE(dropout_keep(seed, offset, 1.0, e)) << "keep_prob 1 keeps everything";
  }
  EXPECT_GT(kept, 0);
  EXPECT_LT(kept, 9);
}

TEST(Philox, MaskBytesRule) {
  for (int64_t n : {0, 1, 7, 8, 127, 128, 129, 255, 256, 1000, 123457}) {
    EXPECT_EQ(dropout_mask_bytes(n), (n + 127) / 128 * 16) << n;
    EXPECT_EQ(dropout_mask_bytes(n) % 16, 0) << n;
  }
  EXPECT_EQ(dropout_mask_bytes(1), 16);
  EXPECT_EQ(dropout_mask_bytes(128), 16);
  EXPECT_EQ(dropout_mask_bytes(129), 32);
}

std::vector<uint8_t> gen(int64_t numels, double p, uint64_t seed, uint64_t offset) {
  std::vector<uint8_t> m(static_cast<size_t>(dropout_mask_bytes(numels)) + 8, 0xAB);  // canary past the end
  dropout_gen_mask(m.data(), numels, p, seed, offset);
  for (size_t i = static_cast<size_t>(dropout_mask_bytes(numels)); i < m.size(); ++i)
    EXPECT_EQ(m[i], 0xAB) << "wrote past dropout_mask_bytes at byte " << i;
  m.resize(static_cast<size_t>(dropout_mask_bytes(numels)));
  return m;
}

TEST(Philox, GenMaskMatchesKeepBitsAndPadsWithZeros) {
  const uint64_t seed = 1234567, offset = 99;
  const double keep_prob = 0.8;
  EXPECT_TRUE(gen(0, keep_prob, seed, offset).empty());
  for (int64_t numels : {1, 13, 128, 1000, 4099}) {
    const auto m = gen(numels, keep_prob, seed, offset);
    int bad = 0;
    for (int64_t e = 0; e < static_cast<int64_t>(m.size()) * 8; ++e) {
      const int bit = (m[static_cast<size_t>(e / 8)] >> (e % 8)) & 1;
      const int want = e < numels ? dropout_keep(seed, offset, keep_prob, static_cast<uint64_t>(e)) : 0;
      if (bit != want && bad++ < 5) ADD_FAILURE() << "numels " << numels << " element " << e << " bit " << bit;
    }
  }
}

TEST(Philox, GenMaskIndependentOfThreadCount) {
  const int saved = get_num_threads();
  const int64_t numels = 3 * 131072 * 8 + 77;  // several parallel chunks
  set_num_threads(1);
  const auto a = gen(numels, 0.7, 42, 7);
  set_num_threads(2);
  const auto b = gen(numels, 0.7, 42, 7);
  set_num_threads(3);
  const auto c = gen(numels, 0.7, 42, 7);
  set_num_threads(saved);
  EXPECT_TRUE(a == b);
  EXPECT_TRUE(a == c);
  // Spot check against the element definition deep inside the mask.
  for (int64_t e : {int64_t{0}, numels / 3, numels / 2 + 5, numels - 1})
    EXPECT_EQ((a[static_cast<size_t>(e / 8)] >> (e % 8)) & 1, dropout_keep(42, 7, 0.7, static_cast<uint64_t>(e)) ? 1 : 0);
  // Seed and offset both change the stream.
  EXPECT_FALSE(a == gen(numels, 0.7, 43, 7));
  EXPECT_FALSE(a == gen(numels, 0.7, 42, 8));
}

TEST(Philox, KeepFractionMatchesKeepProb) {
  const int64_t numels = 400000;
  for (double p : {0.1, 0.5, 0.9, 1.0}) {
    const auto m = gen(numels, p, 2024, 3);
    int64_t ones = 0;
    for (uint8_t byte : m) ones += __builtin_popcount(byte);
    const double frac = static_cast<double>(ones) / numels;
    // 5 sigma of a binomial: sqrt(p(1-p)/n) <= 0.00079.
    EXPECT_NEAR(frac, p, 0.004) << "keep_prob " << p;
  }
}

}  // namespace
}  // namespace npufa
