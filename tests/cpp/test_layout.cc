#include <gtest/gtest.h>

#include <string>

#include "npufa/error.h"
#include "npufa/layout.h"

namespace npufa {
namespace {

std::string error_of(const std::string& s) {
  try {
    parse_training_layout(s, "my_op", "my_arg");
  } catch (const ValueError& e) {
    return e.what();
  }
  ADD_FAILURE() << "no ValueError for \"" << s << "\"";
  return {};
}

TEST(Layout, EveryNameParses) {
  const std::pair<const char*, Layout> names[] = {
      {"BSH", Layout::BSH}, {"SBH", Layout::SBH}, {"BSND", Layout::BSND}, {"BNSD", Layout::BNSD}, {"TND", Layout::TND}};
  for (auto [s, l] : names) {
    EXPECT_EQ(parse_training_layout(s, "op"), l) << s;
    EXPECT_STREQ(layout_name(l), s);
  }
}

TEST(Layout, CaseInsensitive) {
  EXPECT_EQ(parse_training_layout("bsh", "op"), Layout::BSH);
  EXPECT_EQ(parse_training_layout("sBh", "op"), Layout::SBH);
  EXPECT_EQ(parse_training_layout("bsnd", "op"), Layout::BSND);
  EXPECT_EQ(parse_training_layout("BnSd", "op"), Layout::BNSD);
  EXPECT_EQ(parse_training_layout("tnd", "op"), Layout::TND);
  EXPECT_EQ(parse_training_layout("Tnd", "op"), Layout::TND);
}

void expect_lists_valid_names(const std::string& msg) {
  for (const char* n : {"BSH", "SBH", "BSND", "BNSD", "TND"}) EXPECT_NE(msg.find(n), std::string::npos) << n << " in " << msg;
  EXPECT_NE(msg.find("my_op"), std::string::npos) << msg;
  EXPECT_NE(msg.find("my_arg"), std::string::npos) << msg;
}

TEST(Layout, BsnhSuggestsBsnd) {
  const std::string msg = error_of("BSNH");
  expect_lists_valid_names(msg);
  EXPECT_NE(msg.find("BSNH"), std::string::npos) << msg;  // names the bad value
  EXPECT_NE(msg.find("did you mean BSND"), std::string::npos) << msg;
  // Lower case is still recognised as the same near miss.
  EXPECT_NE(error_of("bsnh").find("did you mean BSND"), std::string::npos);
}

TEST(Layout, EmptyIsAnError) {
  const std::string msg = error_of("");
  expect_lists_valid_names(msg);
}

TEST(Layout, UnknownIsAnError) {
  const std::string msg = error_of("XYZ");
  expect_lists_valid_names(msg);
  EXPECT_NE(msg.find("XYZ"), std::string::npos) << msg;
  EXPECT_EQ(msg.find("did you mean"), std::string::npos) << "no plausible suggestion for XYZ: " << msg;
}

TEST(Layout, InferenceOnlyAndPaddedNamesAreErrors) {
  for (const char* s : {"BNSD_BSND", "NTD", " BSH", "BSH ", "BS", "BSNDX"}) {
    EXPECT_THROW(parse_training_layout(s, "op"), ValueError) << s;
  }
}

}  // namespace
}  // namespace npufa
