#include "common/file.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <map>
#include <set>
#include <string>

namespace osr {
namespace {

namespace fs = std::filesystem;

// A write that fails (a full file system) leaves the old file as it was and no temp file
// behind; the next write goes through.
TEST(WriteFileAtomic, AFailedWriteLeavesTheOldFileAndNoTempFile) {
  fs::path dir = fs::temp_directory_path() / ("osr-file-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::string path = (dir / "state.json").string();
  std::string old_text = "old";
  ASSERT_TRUE(
      WriteFileAtomic(path, {reinterpret_cast<const uint8_t*>(old_text.data()), old_text.size()})
          .ok());
  SetFileFaultForTest({.path_part = "state.json.tmp", .err = ENOSPC, .write_bytes_left = 0});
  std::string new_text(64 << 10, 'n');
  Status st =
      WriteFileAtomic(path, {reinterpret_cast<const uint8_t*>(new_text.data()), new_text.size()});
  ClearFileFaultForTest();
  EXPECT_EQ(st.code(), Code::kNoSpace) << st.ToString();
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  EXPECT_EQ(ReadSmallFile(path, 1 << 20).value(), "old");
  ASSERT_TRUE(
      WriteFileAtomic(path, {reinterpret_cast<const uint8_t*>(new_text.data()), new_text.size()})
          .ok());
  EXPECT_EQ(ReadSmallFile(path, 1 << 20).value().size(), new_text.size());
  fs::remove_all(dir);
}

// The power-loss model (file.h): what was not synced is gone, names included.
class PowerLossModel : public ::testing::Test {
 protected:
  void SetUp() override {
    top_ = fs::temp_directory_path() / ("osr-powerloss-model-" + std::to_string(::getpid()));
    fs::remove_all(top_);
    root_ = top_ / "root";
    fs::create_directories(root_ / "sub");
    Put("old", "old");
  }
  void TearDown() override {
    StopPowerLossRecorderForTest();
    fs::remove_all(top_);
  }
  // Writes `text` to root/name (created if missing), not synced; returns the file.
  File Put(const std::string& name, const std::string& text) {
    File f = File::Open((root_ / name).string(), File::Mode::kCreate).value();
    EXPECT_TRUE(f.Truncate(0).ok());
    EXPECT_TRUE(f.PWrite(0, {reinterpret_cast<const uint8_t*>(text.data()), text.size()}).ok());
    return f;
  }
  // The image a power loss now leaves, as name -> content ("<dir>" for directories).
  std::map<std::string, std::string> Image() {
    fs::path to = top_ / ("image-" + std::to_string(images_++));
    Status st = WritePowerLossImageForTest(to.string());
    EXPECT_TRUE(st.ok()) << st.ToString();
    std::map<std::string, std::string> out;
    for (const auto& e : fs::recursive_directory_iterator(to)) {
      std::string rel = fs::relative(e.path(), to).string();
      out[rel] = e.is_directory() ? "<dir>" : ReadSmallFile(e.path().string(), 1 << 20).value();
    }
    return out;
  }
  fs::path top_, root_;
  int images_ = 0;
};

TEST_F(PowerLossModel, OnlySyncedDataAndSyncedNamesSurvive) {
  std::vector<std::string> points;
  StartPowerLossRecorderForTest({.root = root_.string(),
                                 .excluded = {},
                                 .on_sync_point = [&](uint64_t k, const std::string& path) {
                                   points.push_back(std::to_string(k) + " " + path);
                                 }});
  using Tree = std::map<std::string, std::string>;
  // What existed at the start counts as synced.
  EXPECT_EQ(Image(), (Tree{{"old", "old"}, {"sub", "<dir>"}}));
  // Written, not synced: the old content; synced: the new.
  File old = Put("old", "new content");
  EXPECT_EQ(Image()["old"], "old");
  ASSERT_TRUE(old.DataSync().ok());
  EXPECT_EQ(Image()["old"], "new content");
  // A new file: absent until its directory is synced, then empty until its data is.
  File fresh = Put("sub/fresh", "fresh");
  EXPECT_EQ(Image().count("sub/fresh"), 0u);
  ASSERT_TRUE(SyncDir((root_ / "sub").string()).ok());
  EXPECT_EQ(Image()["sub/fresh"], "");
  ASSERT_TRUE(fresh.Sync().ok());
  EXPECT_EQ(Image()["sub/fresh"], "fresh");
  // A rename and a remove: undone until the directory is synced.
  std::error_code ec;
  RenamePath((root_ / "sub/fresh").string(), (root_ / "sub/moved").string(), ec);
  ASSERT_FALSE(ec);
  EXPECT_EQ(Image().count("sub/moved"), 0u);
  EXPECT_EQ(Image()["sub/fresh"], "fresh");
  ASSERT_TRUE(SyncDir((root_ / "sub").string()).ok());
  EXPECT_EQ(Image().count("sub/fresh"), 0u);
  EXPECT_EQ(Image()["sub/moved"], "fresh");
  ASSERT_TRUE(RemovePath((root_ / "old").string(), ec));
  EXPECT_EQ(Image()["old"], "new content");  // its inode's last synced content
  ASSERT_TRUE(SyncDir(root_.string()).ok());
  EXPECT_EQ(Image().count("old"), 0u);
  // WriteFileAtomic is durable when it returns; a directory made and never synced is lost.
  std::string state = "state";
  ASSERT_TRUE(WriteFileAtomic((root_ / "state.json").string(),
                              {reinterpret_cast<const uint8_t*>(state.data()), state.size()})
                  .ok());
  ASSERT_TRUE(CreateDirectories((root_ / "made/deeper").string(), ec));
  EXPECT_EQ(Image(), (Tree{{"state.json", "state"}, {"sub", "<dir>"}, {"sub/moved", "fresh"}}));
  // Every sync under the root was a sync point, numbered in order, with its path.
  ASSERT_EQ(points.size(), 7u);
  EXPECT_EQ(points[0], "1 " + (root_ / "old").string());
  EXPECT_EQ(points[6], "7 " + root_.string());
  StopPowerLossRecorderForTest();
  EXPECT_EQ(WritePowerLossImageForTest((top_ / "none").string()).code(), Code::kFailedPrecondition);
}

TEST_F(PowerLossModel, ExcludedTreesAreLeftOutAndPathsOutsideTheRootAreNotSyncPoints) {
  fs::create_directories(root_ / "index");
  Put("index/db", "rocks");
  uint64_t points = 0;
  StartPowerLossRecorderForTest({.root = root_.string(),
                                 .excluded = {"index"},
                                 .on_sync_point = [&](uint64_t, const std::string&) { ++points; }});
  File db = Put("index/db", "rocks 2");
  ASSERT_TRUE(db.Sync().ok());
  File outside = File::Open((top_ / "outside").string(), File::Mode::kCreate).value();
  ASSERT_TRUE(outside.Sync().ok());
  EXPECT_EQ(points, 0u);
  EXPECT_EQ(PowerLossSyncPointsForTest(), 0u);
  auto image = Image();
  EXPECT_EQ(image.count("index"), 0u);
  EXPECT_EQ(image["old"], "old");
}

TEST_F(PowerLossModel, WritebackImagesTakeAnySubsetOfTheUnsyncedBlocks) {
  StartPowerLossRecorderForTest({.root = root_.string(), .excluded = {}, .on_sync_point = {}});
  File f = Put("log", std::string(4096, 'a'));
  ASSERT_TRUE(f.DataSync().ok());
  ASSERT_TRUE(SyncDir(root_.string()).ok());
  std::string more = std::string(4096, 'b') + std::string(4096, 'c');
  ASSERT_TRUE(f.PWrite(4096, {reinterpret_cast<const uint8_t*>(more.data()), more.size()}).ok());
  std::set<std::string> seen;
  for (uint64_t seed = 1; seed <= 64; ++seed) {
    fs::path to = top_ / ("writeback-" + std::to_string(seed));
    ASSERT_TRUE(WritePowerLossImageForTest(to.string(), seed).ok());
    std::string text = ReadSmallFile((to / "log").string(), 1 << 20).value();
    ASSERT_EQ(text.substr(0, 4096), std::string(4096, 'a'));  // synced: always there
    std::string shape;
    for (size_t at = 4096; at < text.size(); at += 4096) shape += text[at] == 0 ? '0' : text[at];
    seen.insert(shape);
  }
  // Nothing, b, b then c, and c after a hole.
  EXPECT_EQ(seen, (std::set<std::string>{"", "b", "bc", "0c"}));
  EXPECT_EQ(Image()["log"], std::string(4096, 'a'));  // without writeback: the synced only
}

}  // namespace
}  // namespace osr
