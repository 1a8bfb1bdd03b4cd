// npufa._C: ndarrays (any DLPack producer) -> TensorView, C++ errors -> Python errors. No logic.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include "npufa/npufa.h"

namespace nb = nanobind;
using Array = nb::ndarray<nb::device::cpu>;
using OptArray = std::optional<Array>;
using OptList = std::optional<std::vector<int64_t>>;

namespace {

npufa::DType to_dtype(const nb::dlpack::dtype& t) {
  using C = nb::dlpack::dtype_code;
  const auto code = static_cast<C>(t.code);
  if (code == C::Float && t.bits == 32) return npufa::DType::F32;
  if (code == C::Float && t.bits == 16) return npufa::DType::F16;
  if (code == C::Float && t.bits == 64) return npufa::DType::F64;
  if (code == C::Bfloat && t.bits == 16) return npufa::DType::BF16;
  if (code == C::Bool) return npufa::DType::Bool;
  if (code == C::Int && t.bits == 8) return npufa::DType::I8;
  if (code == C::Int && t.bits == 32) return npufa::DType::I32;
  if (code == C::Int && t.bits == 64) return npufa::DType::I64;
  if (code == C::UInt && t.bits == 8) return npufa::DType::U8;
  throw npufa::TypeError("npufa: unsupported tensor dtype (code " + std::to_string(t.code) + ", " +
                         std::to_string(t.bits) + " bits)");
}

npufa::TensorView view(const Array& a) {
  std::vector<int64_t> shape(a.ndim()), strides(a.ndim());
  for (size_t i = 0; i < a.ndim(); ++i) {
    shape[i] = static_cast<int64_t>(a.shape(i));
    strides[i] = static_cast<int64_t>(a.stride(i));
  }
  return npufa::TensorView(a.data(), to_dtype(a.dtype()), std::move(shape), std::move(strides));
}

std::optional<npufa::TensorView> view(const OptArray& a) {
  if (!a) return std::nullopt;
  return view(*a);
}

template <class T>
T item(const nb::tuple& t, size_t i) {
  return nb::cast<T>(t[i]);
}

// The forward's arguments, in torch_npu order without gen_mask_parallel/sync: query, key, value,
// head_num, input_layout, pse, padding_mask, atten_mask, scale, keep_prob, pre_tockens,
// next_tockens, inner_precise, prefix, actual_seq_qlen, actual_seq_kvlen, sparse_mode,
// softmax_layout, sink, dropout_mask, seed, offset, then v2's pse_type, q_start_idx, kv_start_idx,
// query_rope, key_rope, and the op name for messages (kept alive in `op`).
npufa::FusionAttentionParams fwd_params(const nb::tuple& a, std::string& op) {
  if (a.size() != 28) throw npufa::ValueError("npufa._C: expected 28 forward arguments, got " + std::to_string(a.size()));
  npufa::FusionAttentionParams p;
  p.query = view(item<Array>(a, 0));
  p.key = view(item<Array>(a, 1));
  p.value = view(item<Array>(a, 2));
  p.head_num = item<int64_t>(a, 3);
  p.input_layout = item<std::string>(a, 4);
  p.pse = view(item<OptArray>(a, 5));
  p.padding_mask = view(item<OptArray>(a, 6));
  p.atten_mask = view(item<OptArray>(a, 7));
  p.scale = item<double>(a, 8);
  p.keep_prob = item<double>(a, 9);
  p.pre_tockens = item<int64_t>(a, 10);
  p.next_tockens = item<int64_t>(a, 11);
  p.inner_precise = item<int64_t>(a, 12);
  p.prefix = item<OptList>(a, 13);
  p.actual_seq_qlen = item<OptList>(a, 14);
  p.actual_seq_kvlen = item<OptList>(a, 15);
  p.sparse_mode = item<int64_t>(a, 16);
  p.softmax_layout = item<std::string>(a, 17);
  p.sink = view(item<OptArray>(a, 18));
  p.dropout_mask = view(item<OptArray>(a, 19));
  p.seed = item<int64_t>(a, 20);
  p.offset = item<int64_t>(a, 21);
  p.pse_type = item<int64_t>(a, 22);
  p.q_start_idx = item<OptList>(a, 23);
  p.kv_start_idx = item<OptList>(a, 24);
  p.query_rope = view(item<OptArray>(a, 25));
  p.key_rope = view(item<OptArray>(a, 26));
  op = item<std::string>(a, 27);
  p.op = op.c_str();
  return p;
}

}  // namespace

NB_MODULE(_C, m) {
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const npufa::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    }
  });

  m.def("set_num_threads", &npufa::set_num_threads, nb::arg("n"));
  m.def("get_num_threads", &npufa::get_num_threads);

  m.def("philox4x32_10", [](std::array<uint32_t, 4> c, std::array<uint32_t, 2> k) {
    return npufa::philox4x32_10(c, k);
  });
  m.def("dropout_mask_bytes", &npufa::dropout_mask_bytes, nb::arg("numels"));
  m.def(
      "dropout_gen_mask",
      [](const Array& out, int64_t numels, double keep_prob, int64_t seed, int64_t offset) {
        const auto v = view(out);
        if (v.dtype != npufa::DType::U8 || v.dim() != 1 || v.stride(0) != 1 ||
            v.size(0) != npufa::dropout_mask_bytes(numels))
          throw npufa::ValueError("dropout_gen_mask: out must be a contiguous uint8 vector of " +
                                  std::to_string(npufa::dropout_mask_bytes(numels)) + " bytes");
        npufa::dropout_gen_mask(static_cast<uint8_t*>(v.data), numels, keep_prob, static_cast<uint64_t>(seed),
                                static_cast<uint64_t>(offset));
      },
      nb::arg("out"), nb::arg("numels"), nb::arg("keep_prob"), nb::arg("seed"), nb::arg("offset"),
      nb::call_guard<nb::gil_scoped_release>());

  m.def(
      "fusion_attention_fwd",
      [](const nb::tuple& args, OptArray out, OptArray smax, OptArray ssum) -> nb::object {
        std::string op;
        npufa::FusionAttentionParams p = fwd_params(args, op);
        if (!out || !smax || !ssum) {  // validation only: the output shapes
          const auto s = npufa::fusion_attention_output_shapes(p);
          return nb::cast(std::make_tuple(s.attention_out, s.softmax_max, s.softmax_sum));
        }
        p.attention_out = view(*out);
        p.softmax_max = view(*smax);
        p.softmax_sum = view(*ssum);
        npufa::FusionAttentionResult r;
        {
          nb::gil_scoped_release release;
          r = npufa::fusion_attention_fwd(p);
        }
        return nb::cast(std::make_tuple(r.seed, r.offset, r.numels));
      },
      nb::arg("args"), nb::arg("attention_out").none() = nb::none(), nb::arg("softmax_max").none() = nb::none(),
      nb::arg("softmax_sum").none() = nb::none(),
      "npu_fusion_attention into the given outputs; with no outputs, validates and returns their shapes. "
      "args: see fwd_params.");

  m.def(
      "fusion_attention_grad",
      [](const nb::tuple& args, const Array& dy, OptArray softmax_max, OptArray softmax_sum, OptArray attention_in,
         int64_t numels, const Array& dq, const Array& dk, const Array& dv, OptArray dpse, OptArray dsink,
         OptArray dq_rope, OptArray dk_rope) {
        npufa::FusionAttentionGradParams g;
        std::string op;
        g.fwd = fwd_params(args, op);
        g.dy = view(dy);
        g.softmax_max = view(softmax_max);
        g.softmax_sum = view(softmax_sum);
        g.attention_in = view(attention_in);
        g.numels = numels;
        g.dq = view(dq);
        g.dk = view(dk);
        g.dv = view(dv);
        g.dpse = view(dpse);
        g.dsink = view(dsink);
        g.dq_rope = view(dq_rope);
        g.dk_rope = view(dk_rope);
        nb::gil_scoped_release release;
        npufa::fusion_attention_grad(g);
      },
      nb::arg("args"), nb::arg("dy"), nb::arg("softmax_max").none(), nb::arg("softmax_sum").none(),
      nb::arg("attention_in").none(), nb::arg("numels"), nb::arg("dq"), nb::arg("dk"), nb::arg("dv"),
      nb::arg("dpse").none(), nb::arg("dsink").none(), nb::arg("dq_rope").none() = nb::none(),
      nb::arg("dk_rope").none() = nb::none());
}
