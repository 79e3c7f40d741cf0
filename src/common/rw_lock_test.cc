#include "common/rw_lock.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <shared_mutex>
#include <thread>
#include <vector>

namespace osr {
namespace {

using Clock = std::chrono::steady_clock;

TEST(WriterFirstSharedMutex, ReadersShareItAndAWriterHasItAlone) {
  WriterFirstSharedMutex mu;
  {
    std::shared_lock a(mu);
    ASSERT_TRUE(mu.try_lock_shared());  // a second reader gets in beside the first
    mu.unlock_shared();
    EXPECT_FALSE(mu.try_lock());
  }
  std::unique_lock w(mu);
  EXPECT_FALSE(mu.try_lock_shared());
}

// The point of it: once a writer waits, a new reader waits behind it (std::shared_mutex
// on glibc lets the reader in, so a writer can wait for ever).
TEST(WriterFirstSharedMutex, AWaitingWriterStopsNewReaders) {
  WriterFirstSharedMutex mu;
  std::shared_lock first(mu);
  std::atomic<bool> written{false};
  std::thread writer([&] {
    std::unique_lock w(mu);
    written = true;
  });
  // Until the writer waits, a reader gets in; once it waits, none does.
  bool reader_refused = false;
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  while (!reader_refused && Clock::now() < deadline) {
    if (mu.try_lock_shared()) {
      mu.unlock_shared();
      std::this_thread::yield();
    } else {
      reader_refused = true;
    }
  }
  EXPECT_TRUE(reader_refused) << "a reader got in for 10 s while a writer waited";
  EXPECT_FALSE(written.load());
  first.unlock();
  writer.join();
  EXPECT_TRUE(written.load());
  EXPECT_TRUE(mu.try_lock_shared());  // and readers go on after it
  mu.unlock_shared();
}

// Readers that never pause (their holds overlap) still let a writer in, again and again.
TEST(WriterFirstSharedMutex, ReadersThatNeverPauseDoNotStarveAWriter) {
  WriterFirstSharedMutex mu;
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> reads{0};
  uint64_t value = 0;  // written under the lock alone, read under it shared
  std::vector<std::thread> readers;
  for (int i = 0; i < 4; ++i) {
    readers.emplace_back([&] {
      while (!stop.load()) {
        std::shared_lock r(mu);
        // A read that takes a while, so that the readers' holds overlap.
        volatile uint64_t sum = 0;
        for (int k = 0; k < 20000; ++k) sum = sum + value + k;
        reads.fetch_add(1);
      }
    });
  }
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  while (reads.load() < 1000 && Clock::now() < deadline) std::this_thread::yield();
  constexpr int kWrites = 200;
  std::atomic<int> writes{0};
  std::thread writer([&] {
    for (int i = 0; i < kWrites; ++i) {
      std::unique_lock w(mu);
      ++value;
      writes.fetch_add(1);
    }
  });
  while (writes.load() < kWrites && Clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  const int in_time = writes.load();
  stop = true;  // a starved writer gets in now, so the test ends either way
  for (auto& t : readers) t.join();
  writer.join();
  EXPECT_EQ(in_time, kWrites) << "the writer got the lock " << in_time << " times in 10 s beside "
                              << reads.load() << " reads";
  EXPECT_GT(reads.load(), 0u);
}

}  // namespace
}  // namespace osr
