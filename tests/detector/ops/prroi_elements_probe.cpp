// Test-only op: runs the per-element bodies of the CUDA kernels (prroi_pool_elements.h) serially
// on the CPU, so the code the GPU executes is checked on a machine without a GPU.
//
// prroi_elements(input [N, C, H, W], rois [K, 5], grad_output [K, C, PH, PW], ...)
//   -> (output [K, C, PH, PW], grad_input [N, C, H, W], grad_rois [K, 5])
#include <torch/library.h>
#include <ATen/ATen.h>

#include <tuple>

#include "prroi_pool_elements.h"

namespace {

struct PlainAdd {
  template <typename T>
  void operator()(T* address, T value) const { *address += value; }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> prroi_elements(
    const at::Tensor& input_, const at::Tensor& rois_, const at::Tensor& grad_output_,
    double spatial_scale, int64_t pooled_height, int64_t pooled_width) {
  using namespace ioulab::prroi;
  const at::Tensor input = input_.contiguous();
  const at::Tensor rois = rois_.contiguous();
  const at::Tensor grad_output = grad_output_.contiguous();
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t K = rois.size(0);
  at::Tensor output = at::empty({K, C, pooled_height, pooled_width}, input.options());
  at::Tensor grad_input = at::zeros_like(input);
  at::Tensor partials = at::zeros({K, pooled_height * pooled_width, 4}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "prroi_elements", [&] {
    const scalar_t scale = static_cast<scalar_t>(spatial_scale);
    const int64_t total = output.numel();
    for (int64_t i = 0; i < total; ++i)
      output.data_ptr<scalar_t>()[i] =
          forward_element(i, input.data_ptr<scalar_t>(), rois.data_ptr<scalar_t>(), scale, N, C, H,
                          W, pooled_height, pooled_width);
    for (int64_t i = 0; i < total; ++i)
      backward_input_element(i, grad_output.data_ptr<scalar_t>(), rois.data_ptr<scalar_t>(),
                             grad_input.data_ptr<scalar_t>(), scale, N, C, H, W, pooled_height,
                             pooled_width, PlainAdd());
    for (int64_t i = 0; i < K * pooled_height * pooled_width; ++i)
      backward_rois_element(i, grad_output.data_ptr<scalar_t>(), input.data_ptr<scalar_t>(),
                            rois.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(),
                            partials.data_ptr<scalar_t>(), scale, N, C, H, W, pooled_height,
                            pooled_width);
  });
  at::Tensor grad_rois = at::zeros_like(rois);
  grad_rois.narrow(1, 1, 4).copy_(partials.sum(1));
  return {output, grad_input, grad_rois};
}

}  // namespace

TORCH_LIBRARY(ioulab_probe, m) {
  m.def("prroi_elements(Tensor input, Tensor rois, Tensor grad_output, float spatial_scale, "
        "int pooled_height, int pooled_width) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ioulab_probe, CPU, m) {
  m.impl("prroi_elements", &prroi_elements);
}
