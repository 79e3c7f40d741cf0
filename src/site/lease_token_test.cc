// The site's lease-token fence (site/lease_token.h): the highest token is kept on disk
// (0600, atomically), a state-changing call of a lower token is refused naming both, a
// higher one is recorded before the call runs, reads are never refused, a bad header
// value is refused, a damaged file stops the API from starting, and a failed write fences
// anyway but refuses the call.
#include "site/lease_token.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "common/file.h"
#include "common/https.h"

namespace osr::site {
namespace {

namespace fs = std::filesystem;

class LeaseTokenTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           ("osr-lease-token-" + std::to_string(::getpid()) + "-" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    path_ = (dir_ / LeaseTokenFence::kFileName).string();
  }
  void TearDown() override {
    ClearFileFaultForTest();
    fs::remove_all(dir_);
  }
  std::unique_ptr<LeaseTokenFence> OpenOk() {
    auto f = LeaseTokenFence::Open(path_);
    EXPECT_TRUE(f.ok()) << f.status().ToString();
    return f.ok() ? std::move(*f) : nullptr;
  }
  std::string FileText() {
    std::ifstream in(path_);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
  }
  void WriteFile(const std::string& text) { std::ofstream(path_) << text; }

  fs::path dir_;
  std::string path_;
};

TEST_F(LeaseTokenTest, AHigherTokenIsRecordedPrivatelyAndSurvivesAReopen) {
  auto f = OpenOk();
  ASSERT_NE(f, nullptr);
  EXPECT_EQ(f->highest(), 0u);
  EXPECT_FALSE(fs::exists(path_));  // nothing seen, nothing written
  {
    auto a = f->AdmitChange(5);
    ASSERT_TRUE(a.ok()) << a.status().ToString();
  }
  EXPECT_EQ(f->highest(), 5u);
  EXPECT_EQ(f->durable(), 5u);
  EXPECT_EQ(FileText(), "{\"lease_token\":5,\"version\":1}\n");
  struct stat st {};
  ASSERT_EQ(::stat(path_.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  EXPECT_FALSE(fs::exists(path_ + ".tmp"));

  f.reset();
  f = OpenOk();  // a restarted site
  ASSERT_NE(f, nullptr);
  EXPECT_EQ(f->highest(), 5u);
  auto lower = f->AdmitChange(4);
  ASSERT_FALSE(lower.ok());
  EXPECT_EQ(lower.status().code(), Code::kFailedPrecondition);
}

TEST_F(LeaseTokenTest, ALowerTokenIsRefusedNamingBothAndTheWayOut) {
  auto f = OpenOk();
  ASSERT_NE(f, nullptr);
  ASSERT_TRUE(f->AdmitChange(7).ok());
  auto refused = f->AdmitChange(5);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), Code::kFailedPrecondition);
  EXPECT_EQ(HttpStatusFor(refused.status()), 409);
  const std::string& m = refused.status().message();
  EXPECT_NE(m.find("fenced: this site has seen lease token 7; this call carries 5"),
            std::string::npos)
      << m;
  EXPECT_NE(m.find("--lease-token-floor 7"), std::string::npos) << m;
  // The same token and a higher one pass; the higher one is recorded.
  EXPECT_TRUE(f->AdmitChange(7).ok());
  EXPECT_TRUE(f->AdmitChange(8).ok());
  EXPECT_EQ(f->highest(), 8u);
  EXPECT_EQ(FileText(), "{\"lease_token\":8,\"version\":1}\n");
  EXPECT_FALSE(f->AdmitChange(7).ok());
  // A call without a token (an operator's, through any vault; a local tool) passes and
  // changes nothing.
  EXPECT_TRUE(f->AdmitChange(std::nullopt).ok());
  EXPECT_EQ(f->highest(), 8u);
}

TEST_F(LeaseTokenTest, ReadsAreNeverRefusedButRecordAHigherToken) {
  auto f = OpenOk();
  ASSERT_NE(f, nullptr);
  ASSERT_TRUE(f->AdmitChange(3).ok());
  f->NoteRead(2);  // an old leader's read: served, nothing changes
  EXPECT_EQ(f->highest(), 3u);
  f->NoteRead(4);  // the new leader's first look fences the old one
  EXPECT_EQ(f->highest(), 4u);
  EXPECT_EQ(f->durable(), 4u);
  EXPECT_FALSE(f->AdmitChange(3).ok());
  f.reset();
  EXPECT_EQ(OpenOk()->highest(), 4u);
}

TEST_F(LeaseTokenTest, ASiteAtTheHighestTokenSaysHowToResetIt) {
  auto f = OpenOk();
  {
    auto top = f->AdmitChange(kLeaseTokenMax);
    ASSERT_TRUE(top.ok()) << top.status().ToString();
  }
  auto refused = f->AdmitChange(kLeaseTokenMax - 1);
  ASSERT_FALSE(refused.ok());
  const std::string& m = refused.status().message();
  EXPECT_NE(m.find("the highest there is"), std::string::npos) << m;
  EXPECT_EQ(m.find("--lease-token-floor"), std::string::npos) << m;
}

TEST_F(LeaseTokenTest, HeaderValuesOtherThanATokenAreRefused) {
  EXPECT_EQ(ParseLeaseToken("7").value(), 7u);
  EXPECT_EQ(ParseLeaseToken("4611686018427387904").value(), kLeaseTokenMax);  // 2^62
  for (const char* bad :
       {"", "0", "-1", "+5", " 5", "5 ", "5a", "0x10", "1.0", "4611686018427387905",
        "9223372036854775807", "9223372036854775808", "99999999999999999999"}) {
    auto r = ParseLeaseToken(bad);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.status().code(), Code::kInvalidArgument) << bad;
    EXPECT_EQ(HttpStatusFor(r.status()), 400) << bad;
    EXPECT_NE(r.status().message().find("X-Osr-Lease-Token"), std::string::npos)
        << r.status().message();
  }
  // A long value is cut in the message, control characters shown as '?'.
  auto r = ParseLeaseToken(std::string(100, '1') + "\n");
  ASSERT_FALSE(r.ok());
  EXPECT_LT(r.status().message().size(), 200u);
}

TEST_F(LeaseTokenTest, ADamagedFileStopsTheFenceFromOpening) {
  for (const char* text :
       {"", "{", "{\"version\":1}", "{\"version\":2,\"lease_token\":3}",
        "{\"version\":1,\"lease_token\":-3}", "{\"version\":1,\"lease_token\":3,\"x\":1}", "[1]"}) {
    WriteFile(text);
    auto f = LeaseTokenFence::Open(path_);
    ASSERT_FALSE(f.ok()) << text;
    EXPECT_EQ(f.status().code(), Code::kCorruption) << text;
    EXPECT_NE(f.status().message().find(path_), std::string::npos) << f.status().message();
    EXPECT_NE(f.status().message().find("remove it"), std::string::npos);
  }
  WriteFile(std::string(5000, ' '));  // larger than any file this writes
  auto f = LeaseTokenFence::Open(path_);
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), Code::kCorruption);
}

TEST_F(LeaseTokenTest, AFailedWriteFencesAnywayButRefusesTheCall) {
  auto f = OpenOk();
  ASSERT_NE(f, nullptr);
  ASSERT_TRUE(f->AdmitChange(5).ok());
  SetFileFaultForTest({LeaseTokenFence::kFileName, EIO, 0, true});
  auto r = f->AdmitChange(9);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().code(), Code::kFailedPrecondition);
  EXPECT_NE(r.status().message().find("cannot record lease token 9"), std::string::npos)
      << r.status().message();
  EXPECT_EQ(f->highest(), 9u);  // lower tokens are refused from now on
  EXPECT_EQ(f->durable(), 5u);
  EXPECT_FALSE(f->AdmitChange(7).ok());
  f->NoteRead(10);  // served; the write fails again
  EXPECT_EQ(f->highest(), 10u);
  ClearFileFaultForTest();
  EXPECT_EQ(FileText(), "{\"lease_token\":5,\"version\":1}\n");
  ASSERT_TRUE(f->AdmitChange(10).ok());  // written now
  EXPECT_EQ(f->durable(), 10u);
  EXPECT_EQ(OpenOk()->highest(), 10u);
}

// Recording a higher token waits for the state-changing calls of lower tokens still under
// way: once the higher token is recorded, none of them runs any more.
TEST_F(LeaseTokenTest, AHigherTokenWaitsForTheCallsOfALowerOneUnderWay) {
  auto f = OpenOk();
  ASSERT_NE(f, nullptr);
  auto held = f->AdmitChange(5);
  ASSERT_TRUE(held.ok());
  std::atomic<bool> admitted{false};
  std::thread newer([&] {
    auto a = f->AdmitChange(6);
    admitted = a.ok();
  });
  // Bounded look: while the call of token 5 runs, token 6 is not recorded.
  for (int i = 0; i < 20; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    ASSERT_EQ(f->highest(), 5u);
    ASSERT_FALSE(admitted.load());
  }
  *held = LeaseTokenFence::Admission();  // the call of token 5 ends
  newer.join();
  EXPECT_TRUE(admitted.load());
  EXPECT_EQ(f->highest(), 6u);
}

// A read with a higher token does not wait for the calls under way (the new leader's look
// at a site is not held up by an old leader's long call), and fences the lower token at
// once; the new token's first change still waits for them.
TEST_F(LeaseTokenTest, AReadWithAHigherTokenDoesNotWaitButItsFirstChangeDoes) {
  auto f = OpenOk();
  ASSERT_NE(f, nullptr);
  auto held = f->AdmitChange(5);
  ASSERT_TRUE(held.ok());
  f->NoteRead(6);  // returns with the call of token 5 still running
  EXPECT_EQ(f->highest(), 6u);
  EXPECT_EQ(f->durable(), 6u);
  EXPECT_FALSE(f->AdmitChange(5).ok());  // no new call of token 5 starts
  std::atomic<bool> admitted{false};
  std::thread newer([&] { admitted = f->AdmitChange(6).ok(); });
  for (int i = 0; i < 20; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    ASSERT_FALSE(admitted.load());
  }
  *held = LeaseTokenFence::Admission();
  newer.join();
  EXPECT_TRUE(admitted.load());
  // Drained once: later calls of token 6 run side by side.
  auto a = f->AdmitChange(6);
  auto b = f->AdmitChange(6);
  EXPECT_TRUE(a.ok() && b.ok());
}

}  // namespace
}  // namespace osr::site
