// Non-owning tensor views: what crosses the public C++ API (same meaning as a CPU DLPack tensor).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace npufa {

enum class DType : uint8_t { F32, F16, BF16, F64, I8, U8, Bool, I32, I64 };

const char* dtype_name(DType t);
int dtype_size(DType t);

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // in elements; empty means contiguous row-major

  TensorView() = default;
  TensorView(void* d, DType t, std::vector<int64_t> s, std::vector<int64_t> st = {})
      : data(d), dtype(t), shape(std::move(s)), strides(std::move(st)) {
    if (strides.empty()) strides = contiguous_strides(shape);
  }

  int64_t dim() const { return static_cast<int64_t>(shape.size()); }
  int64_t size(int64_t i) const { return shape[static_cast<size_t>(i < 0 ? i + dim() : i)]; }
  int64_t stride(int64_t i) const { return strides[static_cast<size_t>(i < 0 ? i + dim() : i)]; }
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
  template <class T>
  T* ptr() const { return static_cast<T*>(data); }

  static std::vector<int64_t> contiguous_strides(const std::vector<int64_t>& shape) {
    std::vector<int64_t> st(shape.size());
    int64_t acc = 1;
    for (size_t i = shape.size(); i-- > 0;) {
      st[i] = acc;
      acc *= shape[i] > 0 ? shape[i] : 1;
    }
    return st;
  }
};

// "[2, 8, 128]" — used in error messages.
std::string shape_str(const std::vector<int64_t>& shape);

}  // namespace npufa
