#include "common/file.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
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

}  // namespace
}  // namespace osr
