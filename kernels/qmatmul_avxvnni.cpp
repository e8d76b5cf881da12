// The integer kernel (kernels/detail/qmatmul_simd.hpp) built for the avxvnni way of summing
// products of bytes; chosen at run time by ops.cpp.

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "kernels/detail/qmatmul.hpp"

#define KEEL_QDOT 1

namespace keel::detail::avxvnni {
#include "kernels/detail/qmatmul_simd.hpp"
}  // namespace keel::detail::avxvnni
