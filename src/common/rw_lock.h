// WriterFirstSharedMutex: a reader/writer lock under which a waiting writer stops new
// readers, so readers that never pause cannot hold a writer off for ever. glibc's
// rwlock (behind std::shared_mutex) prefers readers: while any reader holds it, the next
// reader gets in too, and a writer waits until no reader happens to hold it.
//
// It meets the standard's SharedMutex requirements, so std::unique_lock and
// std::shared_lock work with it.
//
// Thread model: thread-safe. Not recursive, either way: a thread that holds it shared
// and takes it shared again deadlocks once a writer waits between the two (the writer
// waits for the first hold, the second waits for the writer). Callers never nest it.
#pragma once

#include <pthread.h>

#include "common/check.h"

namespace osr {

class WriterFirstSharedMutex {
 public:
  WriterFirstSharedMutex() {
    pthread_rwlockattr_t attr;
    OSR_CHECK(pthread_rwlockattr_init(&attr) == 0);
    OSR_CHECK(pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP) ==
              0);
    OSR_CHECK(pthread_rwlock_init(&lock_, &attr) == 0);
    pthread_rwlockattr_destroy(&attr);
  }
  ~WriterFirstSharedMutex() { pthread_rwlock_destroy(&lock_); }
  WriterFirstSharedMutex(const WriterFirstSharedMutex&) = delete;
  WriterFirstSharedMutex& operator=(const WriterFirstSharedMutex&) = delete;

  // Programmer errors only can make these fail (EDEADLK: this thread holds it already).
  void lock() { OSR_CHECK(pthread_rwlock_wrlock(&lock_) == 0); }
  bool try_lock() { return pthread_rwlock_trywrlock(&lock_) == 0; }
  void unlock() { OSR_CHECK(pthread_rwlock_unlock(&lock_) == 0); }
  void lock_shared() { OSR_CHECK(pthread_rwlock_rdlock(&lock_) == 0); }
  bool try_lock_shared() { return pthread_rwlock_tryrdlock(&lock_) == 0; }
  void unlock_shared() { OSR_CHECK(pthread_rwlock_unlock(&lock_) == 0); }

 private:
  pthread_rwlock_t lock_;
};

}  // namespace osr
