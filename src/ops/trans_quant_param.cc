// npu_trans_quant_param: fp32 scales (and offsets) packed into the uint64 form the NPU's quantised
// matmuls and the full-int8 attention pipeline take (held in int64, as torch has no uint64).
#include <cmath>
#include <cstring>

#include "npufa/error.h"
#include "npufa/ops/infer_attention.h"

namespace npufa {
namespace {

constexpr const char* kOp = "npu_trans_quant_param";

float at_f32(const TensorView& t, int64_t i) {  // element i of a 1-D or (1, n) fp32 tensor
  return static_cast<const float*>(t.data)[i * t.stride(-1)];
}

void check_vec(const TensorView& t, const char* name) {
  if (t.dtype != DType::F32) fail<TypeError>(kOp, ": ", name, " must be float32, got ", dtype_name(t.dtype));
  if (!(t.dim() == 1 || (t.dim() == 2 && t.size(0) == 1)))
    fail(kOp, ": ", name, " must be 1-D (n,) or 2-D (1, n), got shape ", shape_str(t.shape));
}

}  // namespace

void trans_quant_param(const TensorView& scale, const std::optional<TensorView>& offset, int round_mode,
                       const TensorView& out) {
  check_vec(scale, "scale");
  const int64_t n = scale.size(-1);
  if (offset) {
    check_vec(*offset, "offset");
    if (offset->size(-1) != 1 && offset->size(-1) != n)
      fail(kOp, ": offset must hold 1 or ", n, " values (one per scale), got shape ", shape_str(offset->shape));
  }
  if (round_mode != 0 && round_mode != 1) fail(kOp, ": round_mode must be 0 or 1, got ", round_mode);
  if (out.dtype != DType::I64 || out.numel() != n) fail(kOp, ": out must be int64 with ", n, " elements");
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    const float sc = at_f32(scale, i);
    std::memcpy(&bits, &sc, 4);
    if (round_mode == 1 && (bits & 0x7f800000u) != 0x7f800000u) bits += 0x1000u;  // round to 19 bits (half up)
    uint64_t u = (static_cast<uint64_t>(bits) & 0xFFFFE000u) | (uint64_t{1} << 46);
    if (offset) {
      const double o = std::round(static_cast<double>(at_f32(*offset, offset->size(-1) == 1 ? 0 : i)));
      const int64_t oi = static_cast<int64_t>(o < -256 ? -256 : o > 255 ? 255 : o);
      u = (u & 0x4000FFFFFFFFull) | ((static_cast<uint64_t>(oi) & 0x1FF) << 37);
    }
    static_cast<int64_t*>(out.data)[i * out.stride(-1)] = static_cast<int64_t>(u);
  }
}

}  // namespace npufa
