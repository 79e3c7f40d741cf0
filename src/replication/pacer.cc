#include "replication/pacer.h"

#include <sys/uio.h>

#include <vector>

namespace osr::replication {

Status PacedStream::WriteAll(std::span<const struct iovec> iov) {
  // Invariant: a piece never exceeds the burst, so the bucket never goes into debt and
  // the bound in pacer.h holds at every piece.
  const uint64_t piece_max = pacer_.rate_bytes_per_s() == 0 ? UINT64_MAX : pacer_.burst_bytes();
  std::vector<struct iovec> piece;
  size_t i = 0;       // the iovec being cut
  size_t offset = 0;  // bytes of iov[i] already written
  while (i < iov.size()) {
    piece.clear();
    uint64_t bytes = 0;
    while (i < iov.size() && bytes < piece_max) {
      size_t left = iov[i].iov_len - offset;
      size_t take = static_cast<size_t>(std::min<uint64_t>(left, piece_max - bytes));
      if (take > 0) {
        piece.push_back({static_cast<uint8_t*>(iov[i].iov_base) + offset, take});
        bytes += take;
      }
      offset += take;
      if (offset == iov[i].iov_len) {
        ++i;
        offset = 0;
      }
    }
    if (bytes == 0) break;
    OSR_RETURN_IF_ERROR(wait_(bytes));
    OSR_RETURN_IF_ERROR(inner_.WriteAll(std::span<const struct iovec>(piece)));
    pacer_.Take(bytes, now_ns_());
    if (wrote_) wrote_(bytes);
  }
  return Status::Ok();
}

}  // namespace osr::replication
