// LineVector: a std::vector whose storage starts on a 64-byte (cache line) boundary, for the kernels'
// scratch buffers. malloc aligns to 16 bytes, so where the heap put a buffer decided whether its vectors
// (a panel's rows of 96 or 192 bytes, a query head's 64 floats) were read and written in whole cache
// lines or split across two, from one process to the next.
#pragma once

#include <cstddef>
#include <new>
#include <vector>

template <class T>
struct LineAligned {
  using value_type = T;
  LineAligned() = default;
  template <class U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <class U>
  bool operator==(const LineAligned<U>&) const {
    return true;
  }
  template <class U>
  bool operator!=(const LineAligned<U>&) const {
    return false;
  }
};

template <class T>
using LineVector = std::vector<T, LineAligned<T>>;
