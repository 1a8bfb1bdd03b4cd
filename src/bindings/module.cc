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
      [](const Array& q, const Array& k, const Array& v, int64_t head_num, std::string layout, OptArray pse,
         OptArray padding_mask, OptArray atten_mask, double scale, double keep_prob, int64_t pre, int64_t next,
         int64_t inner_precise, OptList prefix, OptList qlen, OptList kvlen, int64_t sparse_mode,
         std::string softmax_layout, OptArray sink, OptArray dropout_mask, int64_t seed, int64_t offset,
         OptArray out, OptArray smax, OptArray ssum) -> nb::object {
        npufa::FusionAttentionParams p;
        p.query = view(q);
        p.key = view(k);
        p.value = view(v);
        p.head_num = head_num;
        p.input_layout = std::move(layout);
        p.pse = view(pse);
        p.padding_mask = view(padding_mask);
        p.atten_mask = view(atten_mask);
        p.scale = scale;
        p.keep_prob = keep_prob;
        p.pre_tockens = pre;
        p.next_tockens = next;
        p.inner_precise = inner_precise;
        p.prefix = std::move(prefix);
        p.actual_seq_qlen = std::move(qlen);
        p.actual_seq_kvlen = std::move(kvlen);
        p.sparse_mode = sparse_mode;
        p.softmax_layout = std::move(softmax_layout);
        p.sink = view(sink);
        p.dropout_mask = view(dropout_mask);
        p.seed = seed;
        p.offset = offset;
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
      nb::arg("query"), nb::arg("key"), nb::arg("value"), nb::arg("head_num"), nb::arg("input_layout"),
      nb::arg("pse").none(), nb::arg("padding_mask").none(), nb::arg("atten_mask").none(), nb::arg("scale"),
      nb::arg("keep_prob"), nb::arg("pre_tockens"), nb::arg("next_tockens"), nb::arg("inner_precise"),
      nb::arg("prefix").none(), nb::arg("actual_seq_qlen").none(), nb::arg("actual_seq_kvlen").none(),
      nb::arg("sparse_mode"), nb::arg("softmax_layout"), nb::arg("sink").none(), nb::arg("dropout_mask").none(),
      nb::arg("seed"), nb::arg("offset"), nb::arg("attention_out").none() = nb::none(),
      nb::arg("softmax_max").none() = nb::none(), nb::arg("softmax_sum").none() = nb::none(),
      "Validates and runs npu_fusion_attention into the given outputs; with no outputs, validates and "
      "returns their shapes.");
}
