// Declarations shared by the op registration and the CPU / CUDA implementations.
//
// Shapes: input [N, C, H, W]; rois [K, 5] = (batch_index, x1, y1, x2, y2) in input-image
// coordinates; output / grad_output [K, C, PH, PW]; grad_rois [K, 5] (column 0 is always 0).
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <tuple>

namespace ioulab {
namespace prroi {

// Feature dtypes: float32 / float64, and float16 / bfloat16 computed in float32 (opmath type).
inline bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The dtype the kernels compute and accumulate in: float for the half types, else the input's.
inline at::ScalarType compute_dtype(const at::Tensor& input) {
  return at::toOpMathType(input.scalar_type());
}

// Argument checks common to every backend (shapes and dtypes; devices are checked by each impl).
// rois have the dtype of input, or float32 with a float16 / bfloat16 input (box coordinates in
// a half type lose whole pixels: bfloat16 rounds 800 px to a multiple of 4).
inline void check_forward_args(const at::Tensor& input, const at::Tensor& rois,
                               int64_t pooled_height, int64_t pooled_width) {
  TORCH_CHECK(input.dim() == 4, "prroi_pool: input must be [N, C, H, W], got ", input.sizes());
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5,
              "prroi_pool: rois must be [K, 5] (batch_index, x1, y1, x2, y2), got ", rois.sizes());
  TORCH_CHECK(supported_dtype(input.scalar_type()),
              "prroi_pool: input must be float32, float64, float16 or bfloat16, got ",
              input.scalar_type());
  TORCH_CHECK(rois.scalar_type() == input.scalar_type() ||
                  (rois.scalar_type() == at::kFloat && compute_dtype(input) == at::kFloat),
              "prroi_pool: rois must have the dtype of input (or float32 with a half-type input), "
              "got ", rois.scalar_type(), " and ", input.scalar_type());
  TORCH_CHECK(pooled_height > 0 && pooled_width > 0, "prroi_pool: output size must be positive, got ",
              pooled_height, "x", pooled_width);
}

inline void check_backward_args(const at::Tensor& grad_output, const at::Tensor& input,
                                const at::Tensor& rois, const at::Tensor& output,
                                int64_t pooled_height, int64_t pooled_width) {
  check_forward_args(input, rois, pooled_height, pooled_width);
  const std::vector<int64_t> expected{rois.size(0), input.size(1), pooled_height, pooled_width};
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(expected),
              "prroi_pool_backward: grad_output must be ", at::IntArrayRef(expected), ", got ",
              grad_output.sizes());
  TORCH_CHECK(output.sizes() == grad_output.sizes(),
              "prroi_pool_backward: output must have the shape of grad_output");
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type() &&
                  output.scalar_type() == input.scalar_type(),
              "prroi_pool_backward: all tensors must have the dtype of input");
}

}  // namespace prroi
}  // namespace ioulab
