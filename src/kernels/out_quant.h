// Output quantisation (spec §10.3, decision 9), kept out of line: its arithmetic must not be
// contracted into FMAs (the NPU multiplies, then adds).
#pragma once
#include <cstdint>

#include "problem/attn_problem.h"

namespace npufa {

// o[d] · mul for d < Dv of query head n, quantised to int8 at out[d · sd].
void quantise_row(const OutQuant& q, int64_t n, int64_t Dv, const float* o, float mul, int8_t* out, int64_t sd);

}  // namespace npufa
