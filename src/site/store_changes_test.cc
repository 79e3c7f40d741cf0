#include "site/store_changes.h"

#include <gtest/gtest.h>

#include <map>
#include <string>
#include <vector>

namespace osr::site {
namespace {

using Names = std::vector<std::string>;
const std::string kInstance = "0123456789abcdef";

std::map<std::string, std::string> Marks(int n, const std::string& text = "idle") {
  std::map<std::string, std::string> m;
  for (int i = 0; i < n; ++i) m["vm" + std::to_string(100 + i)] = text;
  return m;
}

// From "0" everything; then only what changed, and nothing while nothing does.
TEST(StoreChangeLog, AnswersOnlyWhatChanged) {
  StoreChangeLog log(kInstance);
  auto marks = Marks(500);
  auto first = log.Note("0", marks);
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  EXPECT_TRUE(first->full);
  EXPECT_EQ(first->changed.size(), 500u);
  EXPECT_EQ(first->generation, kInstance + "-1");

  auto idle = log.Note(first->generation, marks);
  ASSERT_TRUE(idle.ok());
  EXPECT_FALSE(idle->full);
  EXPECT_TRUE(idle->changed.empty());
  EXPECT_TRUE(idle->removed.empty());
  EXPECT_EQ(idle->generation, first->generation);  // nothing changed: no new generation

  marks["vm107"] = "durable_seq 9";
  marks.erase("vm300");
  marks["vm999"] = "new";
  auto some = log.Note(idle->generation, marks);
  ASSERT_TRUE(some.ok());
  EXPECT_FALSE(some->full);
  EXPECT_EQ(some->changed, (Names{"vm107", "vm999"}));
  EXPECT_EQ(some->removed, (Names{"vm300"}));
  EXPECT_EQ(some->generation, kInstance + "-2");

  // An older generation gets everything since it (a vault that missed an answer).
  auto behind = log.Note(first->generation, marks);
  ASSERT_TRUE(behind.ok());
  EXPECT_EQ(behind->changed, (Names{"vm107", "vm999"}));
  EXPECT_EQ(behind->removed, (Names{"vm300"}));

  // A store made again under a removed name is changed, not removed.
  marks["vm300"] = "idle";
  auto back = log.Note(some->generation, marks);
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back->changed, (Names{"vm300"}));
  EXPECT_TRUE(back->removed.empty());
}

// Another instance (a restarted site), a generation from the future: a full answer.
TEST(StoreChangeLog, AGenerationItCannotAnswerInPartGetsAFullAnswer) {
  StoreChangeLog log(kInstance);
  auto marks = Marks(3);
  ASSERT_TRUE(log.Note("0", marks).ok());
  for (const std::string since : {"fedcba9876543210-1", "0123456789abcdef-99"}) {
    auto a = log.Note(since, marks);
    ASSERT_TRUE(a.ok()) << since;
    EXPECT_TRUE(a->full) << since;
    EXPECT_EQ(a->changed.size(), 3u) << since;
    EXPECT_TRUE(a->removed.empty()) << since;
  }
}

// Removals are remembered up to a bound; a `since` from before what was forgotten gets
// everything.
TEST(StoreChangeLog, ForgottenRemovalsGiveAFullAnswer) {
  StoreChangeLog log(kInstance);
  auto marks = Marks(static_cast<int>(StoreChangeLog::kRemovedMax) + 10);
  auto start = log.Note("0", marks);
  ASSERT_TRUE(start.ok());
  std::string gen = start->generation;
  std::string very_first = gen;
  // One removal per call, each at its own generation.
  for (size_t i = 0; i < StoreChangeLog::kRemovedMax + 5; ++i) {
    marks.erase(marks.begin());
    auto a = log.Note(gen, marks);
    ASSERT_TRUE(a.ok());
    ASSERT_FALSE(a->full);
    ASSERT_EQ(a->removed.size(), 1u);
    gen = a->generation;
  }
  auto old = log.Note(very_first, marks);
  ASSERT_TRUE(old.ok());
  EXPECT_TRUE(old->full);
  EXPECT_EQ(old->changed.size(), marks.size());
  EXPECT_TRUE(old->removed.empty());
  auto recent = log.Note(gen, marks);
  ASSERT_TRUE(recent.ok());
  EXPECT_FALSE(recent->full);
}

// A bad `since` is refused and changes nothing.
TEST(StoreChangeLog, RefusesABadGeneration) {
  StoreChangeLog log(kInstance);
  auto marks = Marks(2);
  ASSERT_TRUE(log.Note("0", marks).ok());
  for (const std::string& bad : std::vector<std::string>{
           "", "1", "-1", "00", "0123456789abcdef", "0123456789abcdef-", "0123456789ABCDEF-1",
           "0123456789abcdeg-1", "0123456789abcdef-1x", "0123456789abcdef--1",
           "0123456789abcdef-+1", "0123456789abcdef-99999999999999999999", "0123456789abcdef-1 ",
           "0123456789abcdef-" + std::string(100, '1')}) {
    marks["vm100"] = "changed " + bad;
    auto a = log.Note(bad, marks);
    EXPECT_EQ(a.status().code(), Code::kInvalidArgument) << "'" << bad << "'";
  }
  // Nothing of those was noted: the change shows once, now.
  auto a = log.Note(kInstance + "-1", marks);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->changed, (Names{"vm100"}));
}

}  // namespace
}  // namespace osr::site
