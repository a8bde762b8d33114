// The op schemas (one place) and their autocast rule. Implementations are registered per
// dispatch key in prroi_pool_cpu.cpp and prroi_pool_cuda.cu; autograd is registered from Python
// (ioulab/detector/ops/prroi_pool.py) with torch.library.register_autograd.
#include "prroi_pool.h"

#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>

TORCH_LIBRARY(ioulab, m) {
  // output[K, C, PH, PW]: mean of the bilinearly interpolated input over each bin.
  m.def("prroi_pool(Tensor input, Tensor rois, float spatial_scale, int pooled_height, "
        "int pooled_width) -> Tensor");
  // (grad_input[N, C, H, W], grad_rois[K, 5]); a gradient that is not asked for comes back as
  // an empty tensor. `output` is the forward result (the Leibniz-rule RoI gradient needs it).
  m.def("prroi_pool_backward(Tensor grad_output, Tensor input, Tensor rois, Tensor output, "
        "float spatial_scale, int pooled_height, int pooled_width, bool input_grad, "
        "bool rois_grad) -> (Tensor, Tensor)");
}

namespace ioulab {
namespace prroi {
namespace {

// The autocast rule: run in the dtype of the features, with float32 box coordinates.
// * input keeps its dtype: under autocast the FPN maps already are float16 / bfloat16 and the
//   kernels accumulate those in float32 anyway (casting them up would only cost memory); a
//   float32 / float64 map stays as it is. So the output has the input's dtype.
// * rois go to the compute dtype (float32 for a half-type or float32 input, float64 for a
//   float64 one): coordinates must not be rounded to a half type, and the RoI gradient the IoUNet
//   refinement follows comes back in that dtype.
// The op then runs with autocast excluded. The backward op has no rule: autograd calls it with
// the tensors saved by this forward, whose dtypes already agree.
template <c10::DispatchKey autocast_key>
at::Tensor prroi_pool_autocast(const at::Tensor& input, const at::Tensor& rois,
                               double spatial_scale, int64_t pooled_height, int64_t pooled_width) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ioulab::prroi_pool", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double, int64_t,
                                         int64_t)>();
  const at::Tensor cast_rois =
      supported_dtype(input.scalar_type()) ? rois.to(compute_dtype(input)) : rois;
  return op.call(input, cast_rois, spatial_scale, pooled_height, pooled_width);
}

}  // namespace
}  // namespace prroi
}  // namespace ioulab

TORCH_LIBRARY_IMPL(ioulab, AutocastCPU, m) {
  m.impl("prroi_pool", &ioulab::prroi::prroi_pool_autocast<c10::DispatchKey::AutocastCPU>);
}

TORCH_LIBRARY_IMPL(ioulab, AutocastCUDA, m) {
  m.impl("prroi_pool", &ioulab::prroi::prroi_pool_autocast<c10::DispatchKey::AutocastCUDA>);
}
