// Text helpers whose answers are worked out by hand: natural order, human-readable numbers, home folder expansion.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/files.h"
#include "common/strings.h"

namespace loratune {
namespace {

TEST(Text, NaturalOrderComparesDigitRunsAsNumbers) {
  std::vector<std::string> names = {"blocks.10.attn", "blocks.2.attn", "blocks.1.attn", "blocks.11.attn",
                                    "blocks.0.attn", "blocks.02.mlp", "blocks", "a.9", "b.1"};
  std::sort(names.begin(), names.end(), natural_less);
  const std::vector<std::string> expected = {"a.9",           "b.1",          "blocks",         "blocks.0.attn",
                                             "blocks.1.attn", "blocks.2.attn", "blocks.02.mlp", "blocks.10.attn",
                                             "blocks.11.attn"};
  EXPECT_EQ(names, expected);
  EXPECT_FALSE(natural_less("x.3", "x.3"));
}

TEST(Text, HumanCountKeepsSmallRatesVisible) {
  EXPECT_EQ(human_count(0.35), "0.35");
  EXPECT_EQ(human_count(12.345), "12.3");
  EXPECT_EQ(human_count(7.0), "7");
  EXPECT_EQ(human_count(250.4), "250");
  EXPECT_EQ(human_count(98304), "98.3K");
  EXPECT_EQ(human_count(86.3e6), "86.30M");
}

TEST(Text, ExpandHomeOnlyForALeadingTilde) {
  const char* saved = std::getenv("HOME");
  const std::string old = saved ? saved : "";
  setenv("HOME", "/home/사용자", 1);
  EXPECT_EQ(expand_home("~/photos/train"), "/home/사용자/photos/train");
  EXPECT_EQ(expand_home("~"), "/home/사용자");
  EXPECT_EQ(expand_home("~other/photos"), "~other/photos");
  EXPECT_EQ(expand_home("photos/~/x"), "photos/~/x");
  EXPECT_EQ(expand_home("/abs"), "/abs");
  if (saved) setenv("HOME", old.c_str(), 1);
  else unsetenv("HOME");
}

}  // namespace
}  // namespace loratune
