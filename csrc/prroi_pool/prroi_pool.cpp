// The op schemas (one place). Implementations are registered per dispatch key in
// prroi_pool_cpu.cpp and prroi_pool_cuda.cu; autograd is registered from Python
// (ioulab/detector/ops/prroi_pool.py) with torch.library.register_autograd.
#include "prroi_pool.h"

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
