// libFuzzer target: the fuzz input becomes a capture log segment (after a valid segment
// header, so the record parser is reached). The reader must report damage as errors,
// and opening the log must either recover (cutting a damaged end, recorded, and going
// on after it once told what the recovery site holds) or refuse it — never crash, loop
// or accept a record whose CRC does not match.
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>

#include "capture/capture_log.h"
#include "capture/log_reader.h"

using namespace osr;
using namespace osr::capture;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string dir =
      std::filesystem::temp_directory_path() / ("osr-fuzz-log-" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  {
    SegmentHeader h;
    h.first_seq = 1;
    h.disk_bytes = 1 << 20;
    uint8_t hb[SegmentHeader::kSize];
    h.Encode(hb);
    std::ofstream f(dir + "/" + SegmentFileName(1), std::ios::binary);
    // The first input byte chooses whether the header is ours or the fuzzer's.
    if (size > 0 && data[0] & 1) f.write(reinterpret_cast<char*>(hb), sizeof hb);
    if (size > 1)
      f.write(reinterpret_cast<const char*>(data + 1), static_cast<std::streamsize>(size - 1));
  }
  uint64_t next = 1;
  auto scan = LogReader::Scan(dir, [&](const RecordHeader& h, std::span<const uint8_t> p) {
    if (h.seq != next++ || p.size() != h.payload_bytes) __builtin_trap();
    return true;
  });
  CaptureLogOptions o;
  o.dir = dir;
  o.disk_bytes = 1 << 20;
  auto log = CaptureLog::Open(o, nullptr);
  if (log.ok()) {
    if (auto cut = (*log)->pending_cut()) {
      // A damaged end was cut: no record is taken until the recovery site says what it
      // holds (here: what the log kept), then the log goes on after it.
      if (!(*log)->overflowed() || cut->after_seq != (*log)->last_seq() ||
          cut->seq_bound < cut->after_seq) {
        __builtin_trap();
      }
      if ((*log)->Append(RecordKind::kTrim, 0, 4096, {}, 0)) __builtin_trap();
      if (!(*log)->ResumeAfterCut(cut->after_seq).ok()) __builtin_trap();
      (*log)->ResumeAfterOverflow();
    }
    // A recovered log accepts the next record after its last valid one.
    auto seq = (*log)->Append(RecordKind::kTrim, 0, 4096, {}, 0);
    if (!seq || *seq != (scan.ok() ? scan->last_seq + 1 : *seq)) __builtin_trap();
  }
  return 0;
}
