#include "npufa/layout.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <string>

#include "npufa/error.h"

namespace npufa {
namespace {

constexpr std::array<Layout, 5> kTrainingLayouts = {Layout::BSH, Layout::SBH, Layout::BSND, Layout::BNSD,
                                                    Layout::TND};

// Same letters in another order ("BSNH", "BNDS") or one letter off: suggest the nearest name.
int distance(const std::string& a, const std::string& b) {
  std::string sa = a, sb = b;
  std::sort(sa.begin(), sa.end());
  std::sort(sb.begin(), sb.end());
  if (a.size() == b.size()) {
    int diff = 0;
    for (size_t i = 0; i < a.size(); ++i) diff += a[i] != b[i];
    // An anagram (H used as D, or letters swapped) counts as close.
    std::string ha = sa, hb = sb;
    std::replace(ha.begin(), ha.end(), 'H', 'D');
    std::replace(hb.begin(), hb.end(), 'H', 'D');
    std::sort(ha.begin(), ha.end());
    std::sort(hb.begin(), hb.end());
    if (ha == hb) return std::min(diff, 1);
    return diff;
  }
  return 99;
}

}  // namespace

const char* layout_name(Layout l) {
  switch (l) {
    case Layout::BSH: return "BSH";
    case Layout::SBH: return "SBH";
    case Layout::BSND: return "BSND";
    case Layout::BNSD: return "BNSD";
    case Layout::TND: return "TND";
  }
  return "?";
}

Layout parse_training_layout(std::string_view s, const char* op, const char* arg) {
  std::string up(s);
  for (char& c : up) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  for (Layout l : kTrainingLayouts)
    if (up == layout_name(l)) return l;
  std::string valid, hint;
  int best = 2;
  for (Layout l : kTrainingLayouts) {
    valid += std::string(valid.empty() ? "" : ", ") + layout_name(l);
    // Prefer the 4-D name for a 4-letter near miss ("BSNH" is BSND, not BSH).
    int d = distance(up, layout_name(l));
    if (d < best) {
      best = d;
      hint = layout_name(l);
    }
  }
  fail(op, ": ", arg, " must be one of ", valid, " (case-insensitive), got \"", std::string(s), "\"",
       hint.empty() ? std::string() : "; did you mean " + hint + "?");
}

}  // namespace npufa
