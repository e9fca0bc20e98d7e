// How the CUDA host code shapes a launch over table rows, shared by the lookup and bag kernels'
// host code and by their launch-grid emulation (csrc/cuda/emulation): host-only, no CUDA
// headers.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

namespace autoft {

// Elements per lane: 16 bytes of the table dtype when every row pointer stays 16-byte aligned
// (the float32 gradient rows then move VEC floats: one or two 16-byte loads).
inline int pick_vec(at::ScalarType table, int64_t D, std::initializer_list<const void*> ptrs) {
  const int v = 16 / static_cast<int>(c10::elementSize(table));
  if (D % v != 0) {
    return 1;
  }
  for (const void* p : ptrs) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) {
      return 1;
    }
  }
  return v;
}

// Lanes per lookup (or bag): enough to cover a row in one pass, up to a warp.
inline int pick_group(int64_t D, int vec) {
  const int64_t chunks = (D + vec - 1) / vec;
  int g = 1;
  while (g < 32 && g < chunks) {
    g <<= 1;
  }
  return g;
}

// f(std::integral_constant<int, VEC>{}) for the lane widths pick_vec returns.
template <typename F>
void dispatch_vec(int vec, F&& f) {
  switch (vec) {
    case 4:
      f(std::integral_constant<int, 4>{});
      break;
    case 8:
      f(std::integral_constant<int, 8>{});
      break;
    default:
      f(std::integral_constant<int, 1>{});
  }
}

}  // namespace autoft
