// Small helpers for components that run one thread per connection.
#pragma once

#include <pthread.h>

namespace osr {

// Names the calling thread (at most 15 characters are kept), so that `top -H`, ps and
// /proc/PID/task/*/comm show which part of osrd a thread belongs to: osr-send,
// osr-send-acks, osr-capture, osr-recv, osr-nbd, ... A failure changes nothing else.
inline void NameThisThread(const char* name) {
  (void)pthread_setname_np(pthread_self(), name);  // a name is for people: nothing depends on it
}

// Joins and erases the entries whose thread has finished (`done` set as its last act).
// The caller holds the lock that guards `conns`.
template <typename List>
void JoinFinished(List& conns) {
  for (auto it = conns.begin(); it != conns.end();) {
    if ((*it)->done) {
      (*it)->thread.join();
      it = conns.erase(it);
    } else {
      ++it;
    }
  }
}

}  // namespace osr
