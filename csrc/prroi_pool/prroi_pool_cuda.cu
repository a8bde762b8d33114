// CUDA implementation of PrRoIPool (float32 / float64 / float16 / bfloat16): grid-stride wrappers
// around the
// per-element bodies of prroi_pool_elements.h (built on the per-bin math of prroi_pool_math.h,
// which the CPU kernel uses too; a CPU test runs the element bodies serially).
//
// Types: S (scalar_t) stores input / grad_output / output; T = at::opmath_type<S> computes. rois
// are converted to T before the launch; grad_input is accumulated (atomics) and the RoI partials
// summed in T, then cast to the caller's dtypes: no half-type atomics.
//
// Shapes: input [N, C, H, W], rois [K, 5], output [K, C, PH, PW].
//
// Unlike the official code: 64-bit indices, grid-stride loops that stay correct when the grid is
// capped (every thread strides by blockDim * gridDim), a device guard, the current stream and no
// device synchronisation. The RoI gradient is computed per (RoI, bin) with a loop over channels
// and reduced with a sum instead of C * PH * PW atomics on the same four addresses.
#include "prroi_pool.h"
#include "prroi_pool_elements.h"

#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

namespace ioulab {
namespace prroi {
namespace {

constexpr int kThreads = 256;
// The grid is capped; the grid-stride loops cover any number of elements.
constexpr int64_t kMaxBlocks = 4096;

int64_t num_blocks(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks));
}

__device__ __forceinline__ int64_t grid_start() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t grid_stride() {
  return static_cast<int64_t>(blockDim.x) * gridDim.x;
}

template <typename S, typename T>
__global__ void forward_kernel(int64_t total, const S* __restrict__ input,
                               const T* __restrict__ rois, S* __restrict__ output, T spatial_scale,
                               int64_t num_images, int64_t channels, int64_t height, int64_t width,
                               int64_t pooled_height, int64_t pooled_width) {
  for (int64_t i = grid_start(); i < total; i += grid_stride())
    output[i] = static_cast<S>(forward_element(i, input, rois, spatial_scale, num_images, channels,
                                               height, width, pooled_height, pooled_width));
}

struct AtomicAdd {
  template <typename T>
  __device__ __forceinline__ void operator()(T* address, T value) const {
    gpuAtomicAddNoReturn(address, value);
  }
};

// Bins of different RoIs overlap, hence atomics on grad_input.
template <typename S, typename T>
__global__ void backward_input_kernel(int64_t total, const S* __restrict__ grad_output,
                                      const T* __restrict__ rois, T* __restrict__ grad_input,
                                      T spatial_scale, int64_t num_images, int64_t channels,
                                      int64_t height, int64_t width, int64_t pooled_height,
                                      int64_t pooled_width) {
  for (int64_t i = grid_start(); i < total; i += grid_stride())
    backward_input_element(i, grad_output, rois, grad_input, spatial_scale, num_images, channels,
                           height, width, pooled_height, pooled_width, AtomicAdd());
}

// One thread per (k, ph, pw), looping over channels (deterministic, no atomics).
template <typename S, typename T>
__global__ void backward_rois_kernel(int64_t total, const S* __restrict__ grad_output,
                                     const S* __restrict__ input, const T* __restrict__ rois,
                                     const S* __restrict__ output, T* __restrict__ partials,
                                     T spatial_scale, int64_t num_images, int64_t channels,
                                     int64_t height, int64_t width, int64_t pooled_height,
                                     int64_t pooled_width) {
  for (int64_t i = grid_start(); i < total; i += grid_stride())
    backward_rois_element(i, grad_output, input, rois, output, partials, spatial_scale, num_images,
                          channels, height, width, pooled_height, pooled_width);
}

at::Tensor prroi_pool_forward_cuda(const at::Tensor& input_, const at::Tensor& rois_,
                                   double spatial_scale, int64_t pooled_height,
                                   int64_t pooled_width) {
  check_forward_args(input_, rois_, pooled_height, pooled_width);
  TORCH_CHECK(input_.is_cuda() && rois_.is_cuda() && input_.device() == rois_.device(),
              "prroi_pool (CUDA): input and rois must be on the same CUDA device");
  const c10::cuda::CUDAGuard device_guard(input_.device());
  const at::Tensor input = input_.contiguous();
  const at::Tensor rois = rois_.to(compute_dtype(input)).contiguous();
  at::Tensor output = at::empty({rois.size(0), input.size(1), pooled_height, pooled_width},
                                input.options());
  const int64_t total = output.numel();
  if (total == 0) return output;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "prroi_pool_forward_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, T><<<num_blocks(total), kThreads, 0, stream>>>(
        total, input.data_ptr<scalar_t>(), rois.data_ptr<T>(), output.data_ptr<scalar_t>(),
        static_cast<T>(spatial_scale), input.size(0), input.size(1), input.size(2),
        input.size(3), pooled_height, pooled_width);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor> prroi_pool_backward_cuda(
    const at::Tensor& grad_output_, const at::Tensor& input_, const at::Tensor& rois_,
    const at::Tensor& output_, double spatial_scale, int64_t pooled_height, int64_t pooled_width,
    bool input_grad, bool rois_grad) {
  check_backward_args(grad_output_, input_, rois_, output_, pooled_height, pooled_width);
  TORCH_CHECK(grad_output_.is_cuda() && input_.is_cuda() && rois_.is_cuda() && output_.is_cuda(),
              "prroi_pool_backward (CUDA): all tensors must be CUDA tensors");
  const c10::cuda::CUDAGuard device_guard(input_.device());
  const at::Tensor grad_output = grad_output_.contiguous();
  const at::Tensor input = input_.contiguous();
  const at::ScalarType compute = compute_dtype(input);
  const at::Tensor rois = rois_.to(compute).contiguous();
  const at::Tensor output = output_.contiguous();
  const int64_t num_rois = rois.size(0);

  // Accumulated in the compute dtype (atomics), cast to input's dtype at the end.
  at::Tensor grad_input = input_grad ? at::zeros(input.sizes(), input.options().dtype(compute))
                                     : at::empty({0}, input.options());
  at::Tensor grad_rois = rois_grad ? at::zeros_like(rois_) : at::empty({0}, rois_.options());
  if (grad_output.numel() == 0) return {grad_input.to(input.scalar_type()), grad_rois};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "prroi_pool_backward_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const T scale = static_cast<T>(spatial_scale);
    if (input_grad) {
      const int64_t total = grad_output.numel();
      backward_input_kernel<scalar_t, T><<<num_blocks(total), kThreads, 0, stream>>>(
          total, grad_output.data_ptr<scalar_t>(), rois.data_ptr<T>(), grad_input.data_ptr<T>(),
          scale, input.size(0), input.size(1), input.size(2), input.size(3), pooled_height,
          pooled_width);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (rois_grad) {
      const int64_t total = num_rois * pooled_height * pooled_width;
      at::Tensor partials = at::empty({num_rois, pooled_height * pooled_width, 4}, rois.options());
      backward_rois_kernel<scalar_t, T><<<num_blocks(total), kThreads, 0, stream>>>(
          total, grad_output.data_ptr<scalar_t>(), input.data_ptr<scalar_t>(), rois.data_ptr<T>(),
          output.data_ptr<scalar_t>(), partials.data_ptr<T>(), scale, input.size(0),
          input.size(1), input.size(2), input.size(3), pooled_height, pooled_width);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      grad_rois.narrow(1, 1, 4).copy_(partials.sum(1));
    }
  });
  return {grad_input.to(input.scalar_type()), grad_rois};
}

}  // namespace

TORCH_LIBRARY_IMPL(ioulab, CUDA, m) {
  m.impl("prroi_pool", &prroi_pool_forward_cuda);
  m.impl("prroi_pool_backward", &prroi_pool_backward_cuda);
}

}  // namespace prroi
}  // namespace ioulab
