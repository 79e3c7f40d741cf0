// Test model shared by the store's review tests: a history of 4 KiB writes and the disk's
// bytes at chosen seqs.
#pragma once

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "store/recovery_store.h"
#include "store/test_records.h"

namespace osr::store::testing {

// 4 KiB writes at random 4 KiB-aligned offsets of one disk; the model's state at the seqs
// asked for (and the last).
inline constexpr uint64_t kChurnBlock = 4096;

struct Churn {
  uint64_t disk_bytes;
  std::vector<std::vector<uint8_t>> batches;
  std::map<uint64_t, std::vector<uint8_t>> states;  // seq -> disk
  uint64_t last = 0;

  Churn(uint64_t disk, uint64_t records, const std::set<uint64_t>& snap, uint32_t seed = 5,
        uint64_t batch_records = 64)
      : disk_bytes(disk) {
    std::mt19937 rng(seed);
    std::vector<uint8_t> model(disk, 0), wire;
    for (uint64_t seq = 1; seq <= records; ++seq) {
      uint64_t off = (rng() % (disk / kChurnBlock)) * kChurnBlock;
      std::vector<uint8_t> data(kChurnBlock);
      for (auto& b : data) b = static_cast<uint8_t>(rng());
      auto r = WriteRecord(seq, off, data);
      wire.insert(wire.end(), r.begin(), r.end());
      std::copy(data.begin(), data.end(), model.begin() + off);
      if (snap.contains(seq) || seq == records) states[seq] = model;
      if (seq % batch_records == 0 || seq == records) batches.push_back(std::exchange(wire, {}));
    }
    last = records;
  }
  // "" when the store reads disk 0 at seq as the model says.
  std::string Check(RecoveryStore& s, uint64_t seq) const {
    std::vector<uint8_t> got(disk_bytes);
    Status st = s.ReadAt(0, seq, 0, got);
    if (!st.ok()) return "seq " + std::to_string(seq) + ": " + st.ToString();
    if (got != states.at(seq)) return "seq " + std::to_string(seq) + ": WRONG BYTES";
    return "";
  }
};

// Bytes read through read(2)/pread(2) so far (the `rchar:` line of a /proc io file):
// "/proc/self/io" for the process, "/proc/thread-self/io" for the calling thread only.
inline uint64_t ReadCharBytes(const char* io_file = "/proc/self/io") {
  std::ifstream in(io_file);
  std::string key;
  uint64_t v = 0;
  while (in >> key >> v) {
    if (key == "rchar:") return v;
  }
  return 0;
}

// The bytes of a store's history files (a missing folder: 0).
inline uint64_t HistoryFilesBytes(const std::string& store_dir) {
  uint64_t n = 0;
  std::error_code ec;
  for (auto& f : std::filesystem::directory_iterator(store_dir + "/history", ec)) {
    std::error_code size_ec;
    auto b = std::filesystem::file_size(f.path(), size_ec);
    if (!size_ec) n += b;
  }
  return n;
}

}  // namespace osr::store::testing
