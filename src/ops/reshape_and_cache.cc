// _npu_reshape_and_cache: token rows into paged caches at their slots.
#include <cstring>
#include <tuple>

#include "npufa/error.h"
#include "npufa/ops/infer_attention.h"

namespace npufa {
namespace {

// The (block, offset, head) strides of a (blocknum, bs, N, d) or (blocknum, bs, N·d) cache.
struct CacheView {
  int64_t blocks = 0, bs = 0, sblk = 0, soff = 0, sn = 0, sd = 0;
};

CacheView cache_view(const char* op, const TensorView& c, const char* name, const TensorView& rows) {
  const int64_t N = rows.size(1), d = rows.size(2);
  CacheView v;
  if (c.dim() == 4 && c.size(2) == N && c.size(3) == d) {
    v = {c.size(0), c.size(1), c.stride(0), c.stride(1), c.stride(2), c.stride(3)};
  } else if (c.dim() == 3 && c.size(2) == N * d) {
    v = {c.size(0), c.size(1), c.stride(0), c.stride(1), d * c.stride(2), c.stride(2)};
  } else {
    fail(op, ": ", name, " must have shape (blocknum, block_size, ", N, ", ", d, ") or (blocknum, block_size, ",
         N * d, ") to take rows of shape ", shape_str(rows.shape), ", got ", shape_str(c.shape));
  }
  if (c.dtype != rows.dtype)
    fail<TypeError>(op, ": ", name, " must have the dtype of the rows written into it (", dtype_name(rows.dtype),
                    "), got ", dtype_name(c.dtype));
  return v;
}

}  // namespace

void reshape_and_cache(const ReshapeAndCacheParams& p) {
  const char* op = p.op;
  const TensorView &k = p.key, &v = p.value, &slots = p.slot_indices;
  if (k.dim() != 3 || v.dim() != 3 || v.size(0) != k.size(0) || v.size(1) != k.size(1))
    fail(op, ": key and value must be [T, N, D] and [T, N, Dv] with the same T and N, got key ", shape_str(k.shape),
         ", value ", shape_str(v.shape));
  if (slots.dtype != DType::I32 && slots.dtype != DType::I64)
    fail<TypeError>(op, ": slot_indices must be int32 or int64, got ", dtype_name(slots.dtype));
  if (slots.dim() != 1 || slots.size(0) != k.size(0))
    fail(op, ": slot_indices must be 1-D with one slot per token (", k.size(0), "), got shape ",
         shape_str(slots.shape));
  const CacheView kc = cache_view(op, p.key_cache, "key_cache", k), vc = cache_view(op, p.value_cache, "value_cache", v);
  if (kc.blocks != vc.blocks || kc.bs != vc.bs)
    fail(op, ": key_cache and value_cache must have the same blocknum and block_size, got ",
         shape_str(p.key_cache.shape), " and ", shape_str(p.value_cache.shape));
  const int64_t T = k.size(0), cap = kc.blocks * kc.bs;
  auto slot = [&](int64_t t) {
    return slots.dtype == DType::I64 ? static_cast<const int64_t*>(slots.data)[t * slots.stride(0)]
                                     : static_cast<int64_t>(static_cast<const int32_t*>(slots.data)[t * slots.stride(0)]);
  };
  for (int64_t t = 0; t < T; ++t)  // validate everything before writing anything
    if (slot(t) >= cap)
      fail(op, ": slot_indices[", t, "] = ", slot(t), " is beyond the cache (blocknum x block_size = ", cap, ")");
  const int esz = dtype_size(k.dtype);
  for (int64_t t = 0; t < T; ++t) {  // token order: a repeated slot keeps the last row
    const int64_t s = slot(t);
    if (s < 0) continue;  // padding slot
    const int64_t blk = s / kc.bs, off = s % kc.bs;
    for (auto [src, cv, cache] : {std::tuple<const TensorView*, const CacheView*, const TensorView*>{&k, &kc, &p.key_cache},
                                  {&v, &vc, &p.value_cache}}) {
      const char* from = static_cast<const char*>(src->data);
      char* to = static_cast<char*>(cache->data);
      for (int64_t n = 0; n < src->size(1); ++n)
        for (int64_t d = 0; d < src->size(2); ++d)
          std::memcpy(to + (blk * cv->sblk + off * cv->soff + n * cv->sn + d * cv->sd) * esz,
                      from + (t * src->stride(0) + n * src->stride(1) + d * src->stride(2)) * esz,
                      static_cast<size_t>(esz));
    }
  }
}

}  // namespace npufa
