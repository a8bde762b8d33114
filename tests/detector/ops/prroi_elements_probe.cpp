// Test-only op: runs the per-element bodies of the CUDA kernels (prroi_pool_elements.h) serially
// on the CPU, so the code the GPU executes is checked on a machine without a GPU.
//
// prroi_elements(input [N, C, H, W], rois [K, 5], grad_output [K, C, PH, PW], ...)
//   -> (output [K, C, PH, PW], grad_input [N, C, H, W], grad_rois [K, 5])
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <tuple>

#include "prroi_pool_elements.h"

namespace {

struct PlainAdd {
  template <typename T>
  void operator()(T* address, T value) const { *address += value; }
};

// Half-type inputs are run like the CUDA launcher does: rois, output, grad_input and partials in
// the compute type T = at::opmath_type<S>, cast back to the input's / rois' dtype at the end.
std::tuple<at::Tensor, at::Tensor, at::Tensor> prroi_elements(
    const at::Tensor& input_, const at::Tensor& rois_, const at::Tensor& grad_output_,
    double spatial_scale, int64_t pooled_height, int64_t pooled_width) {
  using namespace ioulab::prroi;
  const at::Tensor input = input_.contiguous();
  const at::ScalarType compute = at::toOpMathType(input.scalar_type());
  const at::Tensor rois = rois_.to(compute).contiguous();
  const at::Tensor grad_output = grad_output_.contiguous();
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t K = rois.size(0);
  const at::TensorOptions options = input.options().dtype(compute);
  at::Tensor output = at::empty({K, C, pooled_height, pooled_width}, options);
  at::Tensor grad_input = at::zeros(input.sizes(), options);
  at::Tensor partials = at::zeros({K, pooled_height * pooled_width, 4}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "prroi_elements",
                                  [&] {
    using T = at::opmath_type<scalar_t>;
    const T scale = static_cast<T>(spatial_scale);
    const int64_t total = output.numel();
    // The stored output as the CUDA forward writes it (rounded to S).
    at::Tensor stored = at::empty(output.sizes(), input.options());
    for (int64_t i = 0; i < total; ++i) {
      output.data_ptr<T>()[i] = forward_element(i, input.data_ptr<scalar_t>(), rois.data_ptr<T>(),
                                                scale, N, C, H, W, pooled_height, pooled_width);
      stored.data_ptr<scalar_t>()[i] = static_cast<scalar_t>(output.data_ptr<T>()[i]);
    }
    for (int64_t i = 0; i < total; ++i)
      backward_input_element(i, grad_output.data_ptr<scalar_t>(), rois.data_ptr<T>(),
                             grad_input.data_ptr<T>(), scale, N, C, H, W, pooled_height,
                             pooled_width, PlainAdd());
    for (int64_t i = 0; i < K * pooled_height * pooled_width; ++i)
      backward_rois_element(i, grad_output.data_ptr<scalar_t>(), input.data_ptr<scalar_t>(),
                            rois.data_ptr<T>(), stored.data_ptr<scalar_t>(),
                            partials.data_ptr<T>(), scale, N, C, H, W, pooled_height,
                            pooled_width);
  });
  at::Tensor grad_rois = at::zeros_like(rois_);
  grad_rois.narrow(1, 1, 4).copy_(partials.sum(1));
  return {output.to(input.scalar_type()), grad_input.to(input.scalar_type()), grad_rois};
}

}  // namespace

TORCH_LIBRARY(ioulab_probe, m) {
  m.def("prroi_elements(Tensor input, Tensor rois, Tensor grad_output, float spatial_scale, "
        "int pooled_height, int pooled_width) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ioulab_probe, CPU, m) {
  m.impl("prroi_elements", &prroi_elements);
}
