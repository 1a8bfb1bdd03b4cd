// Layout strings are parsed once here; kernels never see them.
#pragma once
#include <string>
#include <string_view>

namespace npufa {

enum class Layout { BSH, SBH, BSND, BNSD, TND };

const char* layout_name(Layout l);
// Case-insensitive. Throws ValueError naming `op` and `arg`, listing the valid names and
// suggesting the nearest one for near misses (e.g. "BSNH" -> BSND).
Layout parse_training_layout(std::string_view s, const char* op, const char* arg = "input_layout");

}  // namespace npufa
