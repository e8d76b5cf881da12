// The integer kernel (kernels/detail/qmatmul_simd.hpp) built for the avx512vnni way of summing
// products of bytes; chosen at run time by ops.cpp.

// GCC 12 warns inside its own AVX-512 intrinsics (their masked forms pass a deliberately
// undefined value through) once they are inlined here; nothing of ours is uninitialised.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "kernels/detail/qmatmul.hpp"

#define KEEL_QDOT 2

namespace keel::detail::avx512vnni {
#include "kernels/detail/qmatmul_simd.hpp"
}  // namespace keel::detail::avx512vnni
