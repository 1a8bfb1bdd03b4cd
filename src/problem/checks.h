// Argument checks shared by the ops' canonicalisations.
#pragma once
#include <cstdint>
#include <vector>

#include "npufa/error.h"
#include "npufa/tensor_view.h"

namespace npufa {

inline void check_tensor(const char* op, const TensorView& t, const char* name, DType dt, const std::vector<int64_t>& shape) {
  if (t.dtype != dt) fail<TypeError>(op, ": ", name, " must be ", dtype_name(dt), ", got ", dtype_name(t.dtype));
  if (t.shape != shape) fail(op, ": ", name, " must have shape ", shape_str(shape), ", got ", shape_str(t.shape));
}

// Cumulative lengths (spec §2.6): non-decreasing up to a run of trailing zeros, within T.
inline void check_cumulative(const char* kOp, const std::vector<int64_t>& c, const char* name, int64_t T, const char* tname) {
  size_t last = 0;
  bool any = false;
  for (size_t i = 0; i < c.size(); ++i) {
    if (c[i] < 0) fail(kOp, ": ", name, " must hold non-negative cumulative lengths, got ", shape_str(c));
    if (c[i] != 0) {
      last = i;
      any = true;
    }
  }
  for (size_t i = 1; any && i <= last; ++i)
    if (c[i] < c[i - 1])
      fail(kOp, ": ", name, " must be cumulative (non-decreasing; only trailing zeros may follow), got ", shape_str(c),
           " (element ", i, " = ", c[i], " < element ", i - 1, " = ", c[i - 1], ")");
  if (any && c[last] > T)
    fail(kOp, ": ", name, " must not go beyond the ", tname, " tokens, got total ", c[last], " > T = ", T, " (",
         shape_str(c), ")");
}

}  // namespace npufa
