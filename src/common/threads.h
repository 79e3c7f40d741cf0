// Small helpers for components that run one thread per connection.
#pragma once

namespace osr {

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
