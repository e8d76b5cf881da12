#include "kernels/dtype.hpp"

#include <string>

namespace keel {

std::string_view dtype_name(dtype t) {
  switch (t) {
    case dtype::f32:
      return "f32";
    case dtype::f16:
      return "f16";
    case dtype::q4_0:
      return "q4_0";
    case dtype::q4_1:
      return "q4_1";
    case dtype::q5_0:
      return "q5_0";
    case dtype::q5_1:
      return "q5_1";
    case dtype::q8_0:
      return "q8_0";
    case dtype::q8_1:
      return "q8_1";
    case dtype::q2_k:
      return "q2_k";
    case dtype::q3_k:
      return "q3_k";
    case dtype::q4_k:
      return "q4_k";
    case dtype::q5_k:
      return "q5_k";
    case dtype::q6_k:
      return "q6_k";
    case dtype::q8_k:
      return "q8_k";
    case dtype::i8:
      return "i8";
    case dtype::i16:
      return "i16";
    case dtype::i32:
      return "i32";
    case dtype::i64:
      return "i64";
    case dtype::f64:
      return "f64";
    case dtype::bf16:
      return "bf16";
  }
  // Numbers GGUF does not define only show up in error messages; the buffer is per thread and
  // valid until this thread's next call for an unknown number.
  thread_local std::string unknown;
  unknown = "type#" + std::to_string(static_cast<uint32_t>(t));
  return unknown;
}

std::optional<dtype> parse_dtype(std::string_view s) {
  if (s == "f32") return dtype::f32;
  if (s == "f16") return dtype::f16;
  if (s == "bf16") return dtype::bf16;
  if (s == "q8_0") return dtype::q8_0;
  return std::nullopt;
}

bool dtype_supported(dtype t) {
  return t == dtype::f32 || t == dtype::f16 || t == dtype::bf16 || is_block_quantized(t);
}

bool is_block_quantized(dtype t) {
  switch (t) {
    case dtype::q4_0:
    case dtype::q4_1:
    case dtype::q5_0:
    case dtype::q5_1:
    case dtype::q8_0:
    case dtype::q2_k:
    case dtype::q3_k:
    case dtype::q4_k:
    case dtype::q5_k:
    case dtype::q6_k:
      return true;
    default:
      return false;
  }
}

std::optional<dtype_layout> layout_of(dtype t) {
  // Block sizes as in ggml (ggml-common.h); K-quants hold 256 elements per super-block.
  switch (t) {
    case dtype::f32:
      return dtype_layout{1, 4};
    case dtype::f16:
      return dtype_layout{1, 2};
    case dtype::bf16:
      return dtype_layout{1, 2};
    case dtype::q4_0:
      return dtype_layout{32, 18};
    case dtype::q4_1:
      return dtype_layout{32, 20};
    case dtype::q5_0:
      return dtype_layout{32, 22};
    case dtype::q5_1:
      return dtype_layout{32, 24};
    case dtype::q8_0:
      return dtype_layout{32, 34};
    case dtype::q8_1:
      return dtype_layout{32, 36};
    case dtype::q2_k:
      return dtype_layout{256, 84};
    case dtype::q3_k:
      return dtype_layout{256, 110};
    case dtype::q4_k:
      return dtype_layout{256, 144};
    case dtype::q5_k:
      return dtype_layout{256, 176};
    case dtype::q6_k:
      return dtype_layout{256, 210};
    case dtype::q8_k:
      return dtype_layout{256, 292};
    case dtype::i8:
      return dtype_layout{1, 1};
    case dtype::i16:
      return dtype_layout{1, 2};
    case dtype::i32:
      return dtype_layout{1, 4};
    case dtype::i64:
      return dtype_layout{1, 8};
    case dtype::f64:
      return dtype_layout{1, 8};
  }
  return std::nullopt;
}

}  // namespace keel
