#include "npufa/dropout.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "npufa/parallel.h"

namespace npufa {

std::array<uint32_t, 4> philox4x32_10(std::array<uint32_t, 4> c, std::array<uint32_t, 2> k) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    uint64_t p0 = static_cast<uint64_t>(kM0) * c[0];
    uint64_t p1 = static_cast<uint64_t>(kM1) * c[2];
    c = {static_cast<uint32_t>(p1 >> 32) ^ c[1] ^ k[0], static_cast<uint32_t>(p1),
         static_cast<uint32_t>(p0 >> 32) ^ c[3] ^ k[1], static_cast<uint32_t>(p0)};
    k[0] += kW0;
    k[1] += kW1;
  }
  return c;
}

uint64_t dropout_threshold(double keep_prob) {
  if (keep_prob >= 1.0) return uint64_t{1} << 32;
  if (keep_prob <= 0.0) return 0;
  return static_cast<uint64_t>(std::llround(keep_prob * 4294967296.0));
}

static inline std::array<uint32_t, 4> block(uint64_t seed, uint64_t offset, uint64_t blk) {
  return philox4x32_10({static_cast<uint32_t>(blk), static_cast<uint32_t>(blk >> 32),
                        static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)},
                       {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)});
}

bool dropout_keep(uint64_t seed, uint64_t offset, double keep_prob, uint64_t e) {
  return block(seed, offset, e >> 2)[e & 3] < dropout_threshold(keep_prob);
}

int64_t dropout_mask_bytes(int64_t numels) { return (numels + 127) / 128 * 16; }

void dropout_gen_mask(uint8_t* out, int64_t numels, double keep_prob, uint64_t seed, uint64_t offset) {
  const int64_t nbytes = dropout_mask_bytes(numels);
  const uint64_t thr = dropout_threshold(keep_prob);
  constexpr int64_t kChunk = 1 << 14;  // bytes per task
  parallel_for((nbytes + kChunk - 1) / kChunk, [&](int64_t c, int) {
    const int64_t b0 = c * kChunk, b1 = std::min(nbytes, b0 + kChunk);
    for (int64_t byte = b0; byte < b1; ++byte) {
      uint8_t v = 0;
      const uint64_t e0 = static_cast<uint64_t>(byte) * 8;
      const auto w0 = block(seed, offset, e0 >> 2), w1 = block(seed, offset, (e0 >> 2) + 1);
      for (int k = 0; k < 8; ++k) {
        if (static_cast<int64_t>(e0) + k >= numels) break;
        const uint32_t w = k < 4 ? w0[k] : w1[k - 4];
        v |= static_cast<uint8_t>((w < thr) << k);
      }
      out[byte] = v;
    }
  });
}

}  // namespace npufa
