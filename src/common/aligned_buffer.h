// AlignedBuffer: a growable byte buffer whose storage is aligned for O_DIRECT I/O.
//
// Thread model: none; its owner guards it.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "common/check.h"

namespace osr {

class AlignedBuffer {
 public:
  static constexpr size_t kAlign = 4096;

  AlignedBuffer() = default;
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  AlignedBuffer(AlignedBuffer&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)),
        size_(std::exchange(o.size_, 0)),
        capacity_(std::exchange(o.capacity_, 0)) {}
  ~AlignedBuffer() { std::free(data_); }

  uint8_t* data() { return data_; }
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  size_t capacity() const { return capacity_; }
  bool empty() const { return size_ == 0; }
  void clear() { size_ = 0; }
  void swap(AlignedBuffer& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(size_, o.size_);
    std::swap(capacity_, o.capacity_);
  }

  // Makes room for n bytes in all (contents up to size() kept).
  void reserve(size_t n) {
    if (n <= capacity_) return;
    size_t cap = capacity_ ? capacity_ : kAlign;
    while (cap < n) cap *= 2;
    auto* p = static_cast<uint8_t*>(std::aligned_alloc(kAlign, cap));
    OSR_CHECK(p != nullptr);
    if (size_ > 0) std::memcpy(p, data_, size_);
    std::free(data_);
    data_ = p;
    capacity_ = cap;
  }
  // Grows (or shrinks) to n bytes; new bytes are not initialised.
  void resize(size_t n) {
    reserve(n);
    size_ = n;
  }
  void append(const void* p, size_t n) {
    reserve(size_ + n);
    if (n > 0) std::memcpy(data_ + size_, p, n);
    size_ += n;
  }
  // Frees the storage when it has grown past `keep` bytes (after a burst).
  void trim(size_t keep) {
    if (capacity_ <= keep || size_ > 0) return;
    std::free(data_);
    data_ = nullptr;
    capacity_ = 0;
  }

 private:
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
  size_t capacity_ = 0;
};

}  // namespace osr
