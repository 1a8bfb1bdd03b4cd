// npufa's dropout bits: Philox4x32-10 keyed by (seed, offset); reproducible on any machine and
// at any thread count (project decision 1).
#pragma once
#include <array>
#include <cstdint>

namespace npufa {

// One Philox4x32-10 block (Random123 definition).
std::array<uint32_t, 4> philox4x32_10(std::array<uint32_t, 4> ctr, std::array<uint32_t, 2> key);

// Keep bit of mask element `e`: element e uses word (e % 4) of the Philox block with
// counter {lo32(e/4), hi32(e/4), lo32(offset), hi32(offset)} and key {lo32(seed), hi32(seed)};
// it is kept iff word < keep_prob * 2^32.
bool dropout_keep(uint64_t seed, uint64_t offset, double keep_prob, uint64_t e);
uint64_t dropout_threshold(double keep_prob);  // keep iff word < threshold

// Bytes of a bit-packed mask of `numels` elements: ceil(numels / 128) * 128 / 8 (torch_npu's size).
int64_t dropout_mask_bytes(int64_t numels);

// Writes the bit-packed mask (bit k of byte t = element 8t+k, 1 = keep) of `numels` elements into
// `out` (dropout_mask_bytes(numels) bytes; padding bits are 0). Parallel, deterministic.
void dropout_gen_mask(uint8_t* out, int64_t numels, double keep_prob, uint64_t seed, uint64_t offset);

}  // namespace npufa
