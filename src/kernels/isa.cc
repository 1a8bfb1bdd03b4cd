// Run-time ISA level for the kernels' dispatch (see tile_common.h).
#include <cstdlib>
#include <cstring>

#include "kernels/tile_common.h"

namespace npufa::tile {

int isa_level() {
  int level = 0;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  level = __builtin_cpu_supports("x86-64-v4") ? kIsaV4 : __builtin_cpu_supports("x86-64-v3") ? kIsaV3 : kIsaBase;
  if (level == kIsaV4 && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni")) level = kIsaV4Dot;
#endif
  if (const char* env = std::getenv("NPUFA_ISA")) {
    const int cap = std::strcmp(env, "avx512") == 0 ? kIsaV4 : std::strcmp(env, "avx2") == 0 ? kIsaV3 : kIsaBase;
    if (cap < level) level = cap;
  }
  return level;
}

}  // namespace npufa::tile
