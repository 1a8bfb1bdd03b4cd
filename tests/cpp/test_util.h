// Helpers shared by the C++ tests: owning tensors, dtype encoders, compressed masks, RNG.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "npufa/tensor_view.h"
#include "reference/reference_attention.h"

namespace npufa::test {

// float -> IEEE half bits, round to nearest even (written independently of src/core/convert.h).
inline uint16_t half_bits(double x) {
  const uint16_t sign = std::signbit(x) ? 0x8000 : 0;
  double a = std::fabs(x);
  if (std::isnan(a)) return 0x7e00;
  if (a == 0) return sign;
  int e;
  std::frexp(a, &e);  // a = f * 2^e, f in [0.5, 1)
  int E = std::max(e - 1, -14);
  double q = std::nearbyint(std::ldexp(a, 10 - E));  // 11-bit significand (or subnormal)
  if (q >= 2048) {
    q /= 2;
    E += 1;
  }
  if (E > 15) return sign | 0x7c00;
  if (q < 1024) return static_cast<uint16_t>(sign | static_cast<uint16_t>(q));
  return static_cast<uint16_t>(sign | ((E + 15) << 10) | (static_cast<int>(q) - 1024));
}

// float -> bfloat16 bits, round to nearest even.
inline uint16_t bf16_bits(double x) {
  const float f = static_cast<float>(x);
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline int esize(DType t) {
  switch (t) {
    case DType::F64: case DType::I64: return 8;
    case DType::F32: case DType::I32: return 4;
    case DType::F16: case DType::BF16: return 2;
    default: return 1;
  }
}

// Value x as stored in dtype t (rounded), read back as a double.
inline double round_to(DType t, double x) {
  switch (t) {
    case DType::F32: return static_cast<float>(x);
    case DType::F16: return ref::half_to_double(half_bits(x));
    case DType::BF16: return ref::bf16_to_double(bf16_bits(x));
    default: return x;
  }
}

// An owning, contiguous tensor.
struct Tensor {
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  std::vector<uint64_t> store;  // 8-byte aligned bytes

  Tensor() = default;
  Tensor(DType t, std::vector<int64_t> s) : dtype(t), shape(std::move(s)) {
    store.assign(static_cast<size_t>((numel() * esize(t) + 7) / 8 + 1), 0);
  }
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t x : shape) n *= x;
    return n;
  }
  void* data() { return store.data(); }
  const void* data() const { return store.data(); }
  uint8_t* bytes() { return reinterpret_cast<uint8_t*>(store.data()); }
  const uint8_t* bytes() const { return reinterpret_cast<const uint8_t*>(store.data()); }
  TensorView view() { return TensorView(data(), dtype, shape); }

  void set(int64_t i, double x) {
    switch (dtype) {
      case DType::F32: static_cast<float*>(data())[i] = static_cast<float>(x); break;
      case DType::F64: static_cast<double*>(data())[i] = x; break;
      case DType::F16: static_cast<uint16_t*>(data())[i] = half_bits(x); break;
      case DType::BF16: static_cast<uint16_t*>(data())[i] = bf16_bits(x); break;
      case DType::U8: case DType::Bool: case DType::I8: bytes()[i] = static_cast<uint8_t>(x); break;
      case DType::I32: static_cast<int32_t*>(data())[i] = static_cast<int32_t>(x); break;
      case DType::I64: static_cast<int64_t*>(data())[i] = static_cast<int64_t>(x); break;
    }
  }
  double get(int64_t i) const {
    switch (dtype) {
      case DType::U8: case DType::Bool: return bytes()[i];
      case DType::I8: return static_cast<int8_t>(bytes()[i]);
      case DType::I32: return static_cast<const int32_t*>(data())[i];
      case DType::I64: return static_cast<double>(static_cast<const int64_t*>(data())[i]);
      default: return ref::load_as_double(data(), dtype, i);
    }
  }
};

// torch.triu(ones(2048, 2048, bool), diagonal=1): the compressed mask of sparse modes 2/3/4/7/8.
inline Tensor& triu2048() {
  static Tensor t = [] {
    Tensor m(DType::Bool, {2048, 2048});
    for (int64_t r = 0; r < 2048; ++r)
      for (int64_t c = 0; c < 2048; ++c) m.bytes()[r * 2048 + c] = c > r;
    return m;
  }();
  return t;
}

// The 3072x2048 compressed prefix mask of sparse mode 6 (§1.6.1).
inline Tensor& prefix_mask3072() {
  static Tensor t = [] {
    Tensor m(DType::Bool, {3072, 2048});
    for (int64_t r = 0; r < 3072; ++r)
      for (int64_t c = 0; c < 2048; ++c) m.bytes()[r * 2048 + c] = r < 2048 ? c > r : c >= 1024;
    return m;
  }();
  return t;
}

inline std::vector<int64_t> cumulative(const std::vector<int64_t>& lens) {
  std::vector<int64_t> c;
  int64_t acc = 0;
  for (int64_t x : lens) c.push_back(acc += x);
  return c;
}

}  // namespace npufa::test
