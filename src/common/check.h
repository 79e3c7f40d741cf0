// Programmer-error checks. They stay on in release builds: a broken invariant
// in a storage system must stop the process loudly, not corrupt data quietly.
#pragma once

#include <cstdio>
#include <cstdlib>

#define OSR_CHECK(cond)                                                             \
  do {                                                                              \
    if (!(cond)) [[unlikely]] {                                                     \
      std::fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                 \
    }                                                                               \
  } while (0)
