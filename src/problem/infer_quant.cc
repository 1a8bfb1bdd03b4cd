#include "problem/infer_quant.h"

#include <cstring>
#include <string>
#include <utility>

#include "core/convert.h"
#include "npufa/error.h"

namespace npufa {
namespace {

bool is_float(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::BF16; }

// The op's own names of the quantisation arguments (the Params struct holds FIA v1's).
struct QNames {
  const char *deq1 = "dequant_scale1", *qs1 = "quant_scale1", *deq2 = "dequant_scale2", *qs2 = "quant_scale2",
             *qo2 = "quant_offset2", *ks = "key_antiquant_scale", *ko = "key_antiquant_offset",
             *vs = "value_antiquant_scale", *vo = "value_antiquant_offset", *kmode = "key_antiquant_mode",
             *vmode = "value_antiquant_mode";
};
QNames qnames(InferOp k) {
  QNames n;
  if (k == InferOp::Prompt) n.deq1 = "deq_scale1", n.deq2 = "deq_scale2";
  if (k == InferOp::FusedV2) {
    n.qs2 = "quant_scale_out", n.qo2 = "quant_offset_out", n.ks = "dequant_scale_key", n.ko = "dequant_offset_key";
    n.vs = "dequant_scale_value", n.vo = "dequant_offset_value", n.kmode = "key_quant_mode";
    n.vmode = "value_quant_mode";
  }
  return n;
}

bool any_antiquant(const InferAttentionParams& p) {
  return p.antiquant_scale || p.antiquant_offset || p.key_antiquant_scale || p.key_antiquant_offset ||
         p.value_antiquant_scale || p.value_antiquant_offset;
}

// Every element of t, row-major, as fp32.
std::vector<float> read_flat(const char* op, const TensorView& t, const char* name) {
  if (!is_float(t.dtype))
    fail<TypeError>(op, ": ", name, " must be float32, float16 or bfloat16, got ", dtype_name(t.dtype));
  const int64_t n = t.numel();
  const bool dense = t.strides == TensorView::contiguous_strides(t.shape);  // the usual case: one pass
  if (dense && t.dtype == DType::F32)
    return std::vector<float>(static_cast<const float*>(t.data), static_cast<const float*>(t.data) + n);
  if (dense) {  // one loop per dtype, which vectorises (decode converts its scales on every call)
    std::vector<float> out(static_cast<size_t>(n));
    const auto* u = static_cast<const uint16_t*>(t.data);
    if (t.dtype == DType::F16)
      for (int64_t i = 0; i < n; ++i) out[static_cast<size_t>(i)] = f16_to_f32(u[i]);
    else
      for (int64_t i = 0; i < n; ++i) out[static_cast<size_t>(i)] = bf16_to_f32(u[i]);
    return out;
  }
  std::vector<float> out;
  out.reserve(static_cast<size_t>(n));
  std::vector<int64_t> idx(static_cast<size_t>(t.dim()), 0);
  for (int64_t i = 0; i < n; ++i) {
    int64_t off = 0;
    for (int64_t a = 0; a < t.dim(); ++a) off += idx[static_cast<size_t>(a)] * t.stride(a);
    out.push_back(t.dtype == DType::F32   ? static_cast<const float*>(t.data)[off]
                  : t.dtype == DType::F16 ? f16_to_f32(static_cast<const uint16_t*>(t.data)[off])
                                          : bf16_to_f32(static_cast<const uint16_t*>(t.data)[off]));
    for (int64_t a = t.dim() - 1; a >= 0; --a) {
      if (++idx[static_cast<size_t>(a)] < t.size(a)) break;
      idx[static_cast<size_t>(a)] = 0;
    }
  }
  return out;
}

// One scale of the full-int8 pipeline: fp32, or npu_trans_quant_param's uint64 (held in int64).
float one_scale(const char* op, const TensorView& t, const char* name) {
  if (t.numel() != 1) fail(op, ": ", name, " must hold one value (per tensor), got shape ", shape_str(t.shape));
  if (t.dtype == DType::I64) {
    const uint64_t u = static_cast<uint64_t>(*static_cast<const int64_t*>(t.data));
    if ((u >> 37) & 0x1FF)
      fail(op, ": ", name, " carries a packed offset (bits 37-45 = ", (u >> 37) & 0x1FF,
           "), which the attention pipeline does not use; pass the scale alone");
    return bits_to_f32(static_cast<uint32_t>(u) & 0xFFFFE000u);
  }
  return read_flat(op, t, name)[0];
}

// The first-axis slice i of a combined (key, value) antiquant tensor.
TensorView slice0(const char* op, const TensorView& t, int64_t i, const char* name) {
  if (t.dim() < 1 || t.size(0) != 2)
    fail(op, ": ", name, " must have a leading axis of 2 (key, value), got shape ", shape_str(t.shape));
  TensorView s = t;
  s.data = static_cast<char*>(t.data) + i * t.stride(0) * dtype_size(t.dtype);
  s.shape.erase(s.shape.begin());
  s.strides.erase(s.strides.begin());
  if (s.shape.empty()) s.shape = {1}, s.strides = {1};
  return s;
}

// One factor (scale or offset) of key or value (`width` = its head dim) in antiquant mode `mode`.
Factor make_factor(const char* op, const TensorView& t, int64_t mode, int64_t width, const QuantShape& s,
                   const char* name) {
  Factor f;
  const int64_t n = t.numel();
  auto need_row_len = [&](int64_t len) {
    if (len < s.max_pos)
      fail(op, ": per-token ", name, " must cover every KV position read (", s.max_pos, "), got shape ",
           shape_str(t.shape));
  };
  auto row = [&] {
    if (t.dtype != DType::F32 && !is_float(t.dtype))
      fail<TypeError>(op, ": ", name, " must be a float tensor, got ", dtype_name(t.dtype));
    f.kind = Factor::Kind::Row;
    f.data = t.data;
    f.dtype = t.dtype;
  };
  switch (mode) {
    case 0: {  // per channel, or per tensor when it holds one value
      std::vector<float> v = read_flat(op, t, name);
      if (n == 1) {
        f.value = v[0];
      } else if (n == s.Nkv * width) {
        f.kind = Factor::Kind::Channel;
        f.ch = std::move(v);
      } else {
        fail(op, ": ", name, " (per channel) must hold num_key_value_heads x D = ", s.Nkv * width,
             " values, e.g. shape (1, ", s.Nkv, ", 1, ", width, "), (1, ", s.Nkv, ", ", width, ") or (1, ",
             s.Nkv * width, "), or one value (per tensor); got shape ", shape_str(t.shape));
      }
      return f;
    }
    case 2: {  // per tensor and head
      if (n != s.Nkv)
        fail(op, ": ", name, " (per head) must have shape (num_key_value_heads,) = (", s.Nkv, ",), got ",
             shape_str(t.shape));
      const std::vector<float> v = read_flat(op, t, name);
      f.kind = Factor::Kind::Channel;
      for (int64_t h = 0; h < s.Nkv; ++h) f.ch.insert(f.ch.end(), static_cast<size_t>(width), v[static_cast<size_t>(h)]);
      return f;
    }
    case 1: {  // per token: (1, B, KV_S) or (B, KV_S)
      if (s.packed && !s.paged) fail(op, ": per-token ", name, " needs a batched layout or block_table");
      const bool ok = (t.dim() == 2 && t.size(0) == s.B) || (t.dim() == 3 && t.size(0) == 1 && t.size(1) == s.B);
      if (!ok) fail(op, ": per-token ", name, " must have shape (1, B, KV_S) or (B, KV_S) with B = ", s.B, ", got ", shape_str(t.shape));
      need_row_len(t.size(-1));
      row();
      f.sb = t.stride(-2), f.ss = t.stride(-1);
      return f;
    }
    case 3: {  // per token and head: (B, Nkv, KV_S)
      if (s.packed && !s.paged) fail(op, ": per-token ", name, " needs a batched layout or block_table");
      if (t.dim() != 3 || t.size(0) != s.B || t.size(1) != s.Nkv)
        fail(op, ": per-token-per-head ", name, " must have shape (B, num_key_value_heads, KV_S) = (", s.B, ", ", s.Nkv,
             ", KV_S), got ", shape_str(t.shape));
      need_row_len(t.size(2));
      row();
      f.sb = t.stride(0), f.sn = t.stride(1), f.ss = t.stride(2);
      return f;
    }
    case 4:
    case 5: {  // per token in the paged layout
      if (!s.paged) fail(op, ": ", name, " in mode ", mode, " (paged per-token) needs block_table");
      const bool ok = mode == 4 ? t.dim() == 2 && t.size(0) == s.blocknum && t.size(1) == s.block_size
                                : t.dim() == 3 && t.size(0) == s.blocknum && t.size(1) == s.Nkv &&
                                      t.size(2) == s.block_size;
      if (!ok)
        fail(op, ": ", name, " in mode ", mode, " must have shape ",
             mode == 4 ? "(blocknum, block_size) = (" + std::to_string(s.blocknum) + ", " + std::to_string(s.block_size)
                       : "(blocknum, num_key_value_heads, block_size) = (" + std::to_string(s.blocknum) + ", " +
                             std::to_string(s.Nkv) + ", " + std::to_string(s.block_size),
             "), got ", shape_str(t.shape));
      row();
      f.paged = true;
      f.sblk = t.stride(0);
      f.sn = mode == 5 ? t.stride(1) : 0;
      f.soff = t.stride(-1);
      return f;
    }
  }
  return f;
}

Dequant make_dequant(const char* op, const TensorView& scale, const std::optional<TensorView>& offset, int64_t mode,
                     int64_t width, const QuantShape& s, const std::string& sname, const std::string& oname) {
  Dequant d;
  d.on = true;
  d.width = width;
  d.scale = make_factor(op, scale, mode, width, s, sname.c_str());
  if (offset) {
    if (offset->shape != scale.shape)
      fail(op, ": ", oname, " must have the shape of ", sname, " ", shape_str(scale.shape), ", got ",
           shape_str(offset->shape));
    d.offset = make_factor(op, *offset, mode, width, s, oname.c_str());
  }
  return d;
}

}  // namespace

QuantPlan plan_quant(const InferAttentionParams& p) {
  const char* op = p.op;
  const QNames nm = qnames(p.kind);
  const TensorView &q = p.query, &k = p.key, &v = p.value;
  QuantPlan qp;
  if (p.dequant_scale_query)
    fail(op, ": dequant_scale_query (MLA full quantisation) is not supported by npufa (decision 7)");
  if (q.dtype != DType::I8 && !is_float(q.dtype))
    fail<TypeError>(op, ": query must be float16, bfloat16, float32 or int8, got ", dtype_name(q.dtype));
  if (k.dtype == DType::I32 || v.dtype == DType::I32)
    fail(op, ": int4 key/value (packed in int32) are not supported by npufa (decision 7)");
  if (p.quant_offset2 && !p.quant_scale2) fail(op, ": ", nm.qo2, " needs ", nm.qs2);
  const bool full = p.dequant_scale1 || p.quant_scale1 || p.dequant_scale2;
  if (q.dtype == DType::I8) {
    if (p.kind == InferOp::Incre)
      fail(op, ": an int8 query is not supported (IFA has no all-int8 pipeline); use int8 key/value with "
               "antiquant_scale");
    if (p.kind == InferOp::FusedV2)
      fail(op, ": an int8 query needs dequant_scale_query, which npufa does not support (decision 7)");
    if (k.dtype != DType::I8 || v.dtype != DType::I8)
      fail<TypeError>(op, ": an int8 query needs int8 key and value, got ", dtype_name(k.dtype), " and ",
                      dtype_name(v.dtype));
    for (auto [t, n] : {std::pair{&p.dequant_scale1, nm.deq1}, {&p.quant_scale1, nm.qs1}, {&p.dequant_scale2, nm.deq2}})
      if (!*t) fail(op, ": an int8 query (full-int8 pipeline) needs ", nm.deq1, ", ", nm.qs1, " and ", nm.deq2, "; ", n, " is None");
    if (any_antiquant(p)) fail(op, ": antiquant scales/offsets cannot be combined with an int8 query");
    if (p.query_rope || p.key_rope) fail(op, ": query_rope/key_rope cannot be combined with an int8 query");
    qp.int8_q = qp.int8_kv = true;
    qp.compute = DType::F32;  // probabilities stay fp32 (decision 8)
    qp.out = p.quant_scale2 ? DType::I8 : DType::F16;
    return qp;
  }
  if (!is_float(q.dtype))
    fail<TypeError>(op, ": query must be float16, bfloat16, float32 or int8, got ", dtype_name(q.dtype));
  if (full)
    fail(op, ": ", p.dequant_scale1 ? nm.deq1 : p.quant_scale1 ? nm.qs1 : nm.deq2,
         " belongs to the full-int8 pipeline (int8 query, key and value), got a ", dtype_name(q.dtype), " query");
  if (k.dtype == DType::I8 && v.dtype == DType::I8) {
    if (p.kind == InferOp::Prompt)
      fail(op, ": int8 key/value need an int8 query (the full-int8 pipeline with ", nm.deq1, ", ", nm.qs1, " and ",
           nm.deq2, "); PFA has no KV antiquant, got a ", dtype_name(q.dtype), " query");
    const bool sep = p.key_antiquant_scale || p.value_antiquant_scale;
    if (!sep && !p.antiquant_scale)
      fail(op, ": int8 key/value need their antiquant scales (",
           p.kind == InferOp::FusedV2 ? "dequant_scale_key/dequant_scale_value"
           : p.kind == InferOp::Incre ? "antiquant_scale"
                                      : "key_antiquant_scale/value_antiquant_scale or antiquant_scale",
           "), got none");
    qp.int8_kv = true;
  } else if (k.dtype != q.dtype || v.dtype != q.dtype) {
    fail<TypeError>(op, ": key and value must have the query's dtype ", dtype_name(q.dtype),
                    " (or both be int8 with antiquant scales), got key ", dtype_name(k.dtype), ", value ",
                    dtype_name(v.dtype));
  } else if (any_antiquant(p)) {
    fail(op, ": ",
         p.kind == InferOp::FusedV2 ? "dequant_scale_key/dequant_scale_value (and their offsets)"
                                    : "antiquant scales/offsets",
         " need int8 key and value, got ", dtype_name(k.dtype));
  }
  qp.compute = q.dtype;
  qp.out = p.quant_scale2 ? DType::I8 : q.dtype;
  return qp;
}

void build_quant(const InferAttentionParams& p, const QuantPlan& qp, const QuantShape& s, AttnProblem& pr) {
  const char* op = p.op;
  const QNames nm = qnames(p.kind);
  if (qp.int8_q) {
    const float deq1 = one_scale(op, *p.dequant_scale1, nm.deq1), qs1 = one_scale(op, *p.quant_scale1, nm.qs1),
                deq2 = one_scale(op, *p.dequant_scale2, nm.deq2);
    pr.scale *= deq1;  // s = (q_i8·k_i8)·deq1·scale
    Dequant raw;       // the int8 values themselves
    raw.on = true;
    raw.scale.value = 1.f;
    pr.q.dq = raw;
    pr.k.dq = raw;
    pr.v.dq = raw;
    pr.v.dq.scale.value = qs1 * deq2;  // o = Σ p·v_i8·qs1·deq2 / l (probabilities kept in fp32)
  } else if (qp.int8_kv) {
    if (pr.k.pbase) fail(op, ": int8 key/value (antiquant) cannot be combined with a shared prefix");
    const bool sep = p.key_antiquant_scale || p.value_antiquant_scale || p.key_antiquant_offset ||
                     p.value_antiquant_offset;
    if (sep) {  // the separate arguments win over the combined ones (§10.1)
      if (!p.key_antiquant_scale || !p.value_antiquant_scale)
        fail(op, ": ", nm.ks, " and ", nm.vs, " must be given together");
      if (p.key_antiquant_offset.has_value() != p.value_antiquant_offset.has_value())
        fail(op, ": ", nm.ko, " and ", nm.vo, " must be given together");
      const int64_t km = p.key_antiquant_mode, vm = p.value_antiquant_mode;
      for (auto [m, n] : {std::pair{km, nm.kmode}, {vm, nm.vmode}})
        if (m < 0 || m > 5) fail(op, ": ", n, " must be in [0, 5], got ", m);
      if (km != vm && !(km == 0 && vm == 1))
        fail(op, ": ", nm.kmode, " and ", nm.vmode, " must be equal, or 0 and 1 (key per channel, value per token), got ",
             km, " and ", vm);
      pr.k.dq = make_dequant(op, *p.key_antiquant_scale, p.key_antiquant_offset, km, s.D, s, nm.ks, nm.ko);
      pr.v.dq = make_dequant(op, *p.value_antiquant_scale, p.value_antiquant_offset, vm, s.Dv, s, nm.vs, nm.vo);
    } else {
      const int64_t mode = p.antiquant_mode;
      if (mode != 0 && mode != 1) fail(op, ": antiquant_mode must be 0 (per channel/tensor) or 1 (per token), got ", mode);
      if (p.antiquant_offset && p.antiquant_offset->shape != p.antiquant_scale->shape)
        fail(op, ": antiquant_offset must have the shape of antiquant_scale ", shape_str(p.antiquant_scale->shape),
             ", got ", shape_str(p.antiquant_offset->shape));
      for (int64_t i = 0; i < 2; ++i) {
        const std::string tag = i == 0 ? "[0] (key)" : "[1] (value)";
        std::optional<TensorView> off;
        if (p.antiquant_offset) off = slice0(op, *p.antiquant_offset, i, "antiquant_offset");
        const Dequant d = make_dequant(op, slice0(op, *p.antiquant_scale, i, "antiquant_scale"), off, mode,
                                       i == 0 ? s.D : s.Dv, s, "antiquant_scale" + tag, "antiquant_offset" + tag);
        (i == 0 ? pr.k.dq : pr.v.dq) = d;
      }
    }
  }
  if (p.quant_scale2) {
    OutQuant& oq = pr.out_quant;
    oq.on = true;
    oq.scale = read_flat(op, *p.quant_scale2, nm.qs2);
    const int64_t n = static_cast<int64_t>(oq.scale.size());
    if (n != 1 && n != s.Nq * s.Dv)
      fail(op, ": ", nm.qs2, " must hold one value (per tensor) or num_heads x D = ", s.Nq * s.Dv,
           " values (per channel), got shape ", shape_str(p.quant_scale2->shape));
    if (p.quant_offset2) {
      oq.offset = read_flat(op, *p.quant_offset2, nm.qo2);
      if (static_cast<int64_t>(oq.offset.size()) != n)
        fail(op, ": ", nm.qo2, " must hold as many values as ", nm.qs2, " (", n, "), got shape ",
             shape_str(p.quant_offset2->shape));
    }
  }
}

}  // namespace npufa
