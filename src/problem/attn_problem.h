// AttnProblem: the canonical problem every kernel sees. Layout strings, sparse-mode numbers and
// cumulative-vs-per-batch lengths have been resolved by the op's canonicalisation.
#pragma once
#include <cstdint>
#include <vector>

#include "mask/mask_spec.h"
#include "npufa/tensor_view.h"

namespace npufa {

// Element (b, n, s, d) of a [B, N, S, D]-like tensor, any layout:
// base + b*sb + (off_b + s)*ss + n*sn + d*sd, with off_b the batch's row offset (TND) or 0.
// One factor of an int8 source's dequantisation (spec §10.1): a constant, a per-channel vector over
// (head, d) materialised in fp32, or a value per row (b, n, s) read from a tensor, dense or by the
// row's paged block and offset.
struct Factor {
  enum class Kind { Const, Channel, Row } kind = Kind::Const;
  float value = 0.f;        // Const
  std::vector<float> ch;    // Channel: ch[n * width + d]
  const void* data = nullptr;  // Row
  DType dtype = DType::F32;
  int64_t sb = 0, sn = 0, ss = 0;  // Row: element b*sb + n*sn + s*ss (s = position in the batch's sequence)
  bool paged = false;              // Row paged: element blk*sblk + n*sn + off*soff
  int64_t sblk = 0, soff = 0;
};

// An int8 source read as (x + offset) · scale.
struct Dequant {
  bool on = false;
  int64_t width = 0;  // row width (the Channel vectors' stride)
  Factor scale, offset;
};

// K/V sources of inference (read through tile::kv_row only) add two ways a row can live elsewhere:
// - paged: row s of batch b is row s % bs of block table[b * tsb + s / bs]; the block starts at
//   base + block * sblk (sb unused);
// - shared prefix: rows s < 0 are row plen + s of the batch-independent prefix tensor pbase
//   (strides pss, psn, psd).
struct Acc4 {
  void* base = nullptr;
  int64_t sb = 0, sn = 0, ss = 0, sd = 1;
  const int32_t* table = nullptr;
  int64_t tsb = 0, tsw = 1, bs = 1, sblk = 0;
  int bs_shift = -1;  // log2(bs) when bs is a power of two (no division per row)
  const void* pbase = nullptr;
  int64_t plen = 0, pss = 0, psn = 0, psd = 1;
  Dequant dq;  // int8 storage (KV antiquant, full-int8 pipeline)
  int64_t at(int64_t b, int64_t n, int64_t s, int64_t d) const { return b * sb + n * sn + s * ss + d * sd; }
};

struct SeqSpan {
  int64_t q_off = 0, q_len = 0, kv_off = 0, kv_len = 0;
};

// Additive position bias, read per (b, n, i, j) of local indices.
struct PseSpec {
  enum class Kind { None, Dense, AlibiDense, AlibiTnd, Flat, Slopes } kind = Kind::None;
  const void* data = nullptr;
  DType dtype = DType::F32;
  int64_t sb = 0, sn = 0, si = 0, sj = 0;  // Dense strides (0 on broadcast axes); Flat: si = has rows, sj = element stride
  int64_t rows = 0, cols = 0;              // Alibi: the compressed [1024, S] block per (b, n)
  int64_t sq = 0;                          // AlibiDense: the full Sq
  std::vector<int64_t> batch_base;         // Flat: element offset of batch b's block
  float mul = 1.0f;                        // s = qk*scale + pse*mul (mul = scale for pse_type 1)
  // Slopes (pse_type 2/3): pse = -slope[b, n] * f(|j - i + diag[b]|), f = identity or sqrt; data fp32
  // with strides sb (0 for [Nq] slopes) and sn.
  bool sqrt_dist = false;
  std::vector<int64_t> diag;
};

struct DropoutSpec {
  enum class Kind { None, Philox, External } kind = DropoutSpec::Kind::None;
  double keep_prob = 1.0;
  uint64_t seed = 0, offset = 0;
  const uint8_t* mask = nullptr;    // External: bit-packed, byte t at mask[t * mask_stride]
  int64_t mask_stride = 1;
  std::vector<int64_t> batch_base;  // element index of (b, n=0, i=0, j=0) in the mask order
};

// Output quantisation (spec §10.3): int8 out from the fp32 row; one (per tensor) or Nq·Dv (per
// channel, c = n·Dv + d) scale/offset values.
struct OutQuant {
  bool on = false;
  std::vector<float> scale, offset;
};

struct AttnProblem {
  DType dtype = DType::F32;      // compute dtype: of q, k, v unless they are int8 (Acc4::dq)
  DType out_dtype = DType::F32;  // of out (int8 with out_quant)
  OutQuant out_quant;
  int64_t B = 0, Nq = 0, Nkv = 0, G = 1, D = 0, Dv = 0;
  int64_t Dr = 0;    // rope head dim (MLA): q·k = q·k + q_rope·k_rope; 0 without rope
  std::vector<SeqSpan> seqs;  // per batch
  Acc4 q, k, v, out;
  Acc4 qr, kr;  // query_rope / key_rope when Dr > 0
  // Softmax stats: 8 consecutive fp32 copies at stat.at(b, n, off + s, 0).
  Acc4 smax, ssum;
  Acc4 lse;  // inference softmax_lse: one fp32 per (b, n, s) when base != nullptr
  float scale = 1.0f;
  PseSpec pse;
  MaskSpec mask;
  std::vector<float> sink;  // [Nq] or empty
  DropoutSpec dropout;
};

}  // namespace npufa
