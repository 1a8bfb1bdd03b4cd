// Scalar fp16/bf16 <-> fp32 conversions, written so loops over them vectorise.
#pragma once
#include <cstdint>
#include <cstring>

#include "npufa/tensor_view.h"

namespace npufa {

__attribute__((always_inline)) inline float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
__attribute__((always_inline)) inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

__attribute__((always_inline)) inline float bf16_to_f32(uint16_t h) { return bits_to_f32(static_cast<uint32_t>(h) << 16); }

// Round to nearest even; NaN stays NaN.
__attribute__((always_inline)) inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// IEEE half -> float (exact; no denormal float arithmetic, so FTZ/DAZ modes do not matter).
__attribute__((always_inline)) inline float f16_to_f32(uint16_t h) {
  constexpr uint32_t kShiftedExp = 0x7c00u << 13;
  uint32_t o = static_cast<uint32_t>(h & 0x7fffu) << 13;
  const uint32_t exp = o & kShiftedExp;
  o += (127u - 15u) << 23;
  if (exp == kShiftedExp) {
    o += (128u - 16u) << 23;  // Inf/NaN
  } else if (exp == 0) {      // zero/subnormal: renormalise with one float subtraction
    o += 1u << 23;
    o = f32_to_bits(bits_to_f32(o) - bits_to_f32(113u << 23));
  }
  return bits_to_f32(o | (static_cast<uint32_t>(h & 0x8000u) << 16));
}

// float -> IEEE half, round to nearest even, overflow to Inf.
__attribute__((always_inline)) inline uint16_t f32_to_f16(float f) {
  uint32_t u = f32_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (u >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: Inf
  if (u < 0x38800000u) {                                                // subnormal or zero
    float a = bits_to_f32(u) + 0.5f;  // adding 0.5 puts the half subnormal bits in the low mantissa
    return static_cast<uint16_t>(sign | (f32_to_bits(a) - 0x3f000000u));
  }
  const uint32_t mant_odd = (u >> 13) & 1u;
  u += 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round
  return static_cast<uint16_t>(sign | (u >> 13));
}

template <DType T>
struct Storage;
template <> struct Storage<DType::F32> { using type = float; };
template <> struct Storage<DType::F16> { using type = uint16_t; };
template <> struct Storage<DType::BF16> { using type = uint16_t; };
template <> struct Storage<DType::I8> { using type = int8_t; };  // int8 K/V (read through Acc4::dq)

template <DType T>
inline float to_f32(typename Storage<T>::type x) {
  if constexpr (T == DType::F32) return x;
  else if constexpr (T == DType::F16) return f16_to_f32(x);
  else return bf16_to_f32(x);
}
template <DType T>
inline typename Storage<T>::type from_f32(float x) {
  if constexpr (T == DType::F32) return x;
  else if constexpr (T == DType::F16) return f32_to_f16(x);
  else return f32_to_bf16(x);
}
// x rounded to T and back (what the NPU does to P before P·V).
template <DType T>
inline float round_to(float x) {
  if constexpr (T == DType::F32) return x;
  else return to_f32<T>(from_f32<T>(x));
}

}  // namespace npufa
