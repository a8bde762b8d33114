// CUDA implementation of PrRoIPool (float32 / float64), built on the per-bin math of
// prroi_pool_math.h (the same inline functions the CPU kernel uses).
//
// Shapes: input [N, C, H, W], rois [K, 5], output [K, C, PH, PW].
//
// Unlike the official code: 64-bit indices, grid-stride loops that stay correct when the grid is
// capped (every thread strides by blockDim * gridDim), a device guard, the current stream and no
// device synchronisation. The RoI gradient is computed per (RoI, bin) with a loop over channels
// and reduced with a sum instead of C * PH * PW atomics on the same four addresses.
#include "prroi_pool.h"
#include "prroi_pool_math.h"

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

template <typename T>
__device__ __forceinline__ bool valid_image(const T* roi, int64_t num_images, int64_t* b) {
  *b = static_cast<int64_t>(roi[0]);
  return *b >= 0 && *b < num_images;
}

// One thread per output element (k, c, ph, pw).
template <typename T>
__global__ void forward_kernel(int64_t total, const T* __restrict__ input,
                               const T* __restrict__ rois, T* __restrict__ output, T spatial_scale,
                               int64_t num_images, int64_t channels, int64_t height, int64_t width,
                               int64_t pooled_height, int64_t pooled_width) {
  for (int64_t i = grid_start(); i < total; i += grid_stride()) {
    const int64_t pw = i % pooled_width;
    const int64_t ph = (i / pooled_width) % pooled_height;
    const int64_t c = (i / (pooled_width * pooled_height)) % channels;
    const int64_t k = i / (pooled_width * pooled_height * channels);
    const T* roi = rois + k * 5;
    const Bin<T> bin = roi_bin(roi, spatial_scale, pooled_height, pooled_width, ph, pw);
    int64_t b;
    T out = T(0);
    if (bin.area > T(0) && valid_image(roi, num_images, &b)) {
      const T* plane = input + (b * channels + c) * height * width;
      out = bin_integral(plane, height, width, bin) / bin.area;
    }
    output[i] = out;
  }
}

// One thread per output element; scatters grad * coefficient into grad_input with atomics
// (bins of different RoIs overlap).
template <typename T>
__global__ void backward_input_kernel(int64_t total, const T* __restrict__ grad_output,
                                      const T* __restrict__ rois, T* __restrict__ grad_input,
                                      T spatial_scale, int64_t num_images, int64_t channels,
                                      int64_t height, int64_t width, int64_t pooled_height,
                                      int64_t pooled_width) {
  for (int64_t i = grid_start(); i < total; i += grid_stride()) {
    const int64_t pw = i % pooled_width;
    const int64_t ph = (i / pooled_width) % pooled_height;
    const int64_t c = (i / (pooled_width * pooled_height)) % channels;
    const int64_t k = i / (pooled_width * pooled_height * channels);
    const T* roi = rois + k * 5;
    const Bin<T> bin = roi_bin(roi, spatial_scale, pooled_height, pooled_width, ph, pw);
    int64_t b;
    if (!(bin.area > T(0)) || !valid_image(roi, num_images, &b)) continue;
    const T g = grad_output[i] / bin.area;
    if (g == T(0)) continue;
    T* plane = grad_input + (b * channels + c) * height * width;
    int64_t h0, h1, w0, w1;
    interval_pixels(bin.y_lo, bin.y_hi, height, &h0, &h1);
    interval_pixels(bin.x_lo, bin.x_hi, width, &w0, &w1);
    for (int64_t h = h0; h <= h1; ++h) {
      const T gy = g * interval_weight(bin.y_lo, bin.y_hi, h);
      for (int64_t w = w0; w <= w1; ++w)
        gpuAtomicAddNoReturn(plane + h * width + w, gy * interval_weight(bin.x_lo, bin.x_hi, w));
    }
  }
}

// One thread per (k, ph, pw), looping over channels; writes the bin's share of the RoI gradient
// to partials[k, ph, pw, 4], summed over bins afterwards (deterministic, no atomics).
template <typename T>
__global__ void backward_rois_kernel(int64_t total, const T* __restrict__ grad_output,
                                     const T* __restrict__ input, const T* __restrict__ rois,
                                     const T* __restrict__ output, T* __restrict__ partials,
                                     T spatial_scale, int64_t num_images, int64_t channels,
                                     int64_t height, int64_t width, int64_t pooled_height,
                                     int64_t pooled_width) {
  for (int64_t i = grid_start(); i < total; i += grid_stride()) {
    const int64_t pw = i % pooled_width;
    const int64_t ph = (i / pooled_width) % pooled_height;
    const int64_t k = i / (pooled_width * pooled_height);
    const T* roi = rois + k * 5;
    const Bin<T> bin = roi_bin(roi, spatial_scale, pooled_height, pooled_width, ph, pw);
    T acc[4] = {T(0), T(0), T(0), T(0)};
    int64_t b;
    if (bin.area > T(0) && valid_image(roi, num_images, &b)) {
      const int64_t n_out = pooled_height * pooled_width;
      for (int64_t c = 0; c < channels; ++c) {
        const int64_t o = (k * channels + c) * n_out + ph * pooled_width + pw;
        const T g = grad_output[o];
        if (g == T(0)) continue;
        const T* plane = input + (b * channels + c) * height * width;
        const T e_x_lo = vertical_edge_integral(plane, height, width, bin.x_lo, bin.y_lo, bin.y_hi);
        const T e_x_hi = vertical_edge_integral(plane, height, width, bin.x_hi, bin.y_lo, bin.y_hi);
        const T e_y_lo = horizontal_edge_integral(plane, height, width, bin.y_lo, bin.x_lo, bin.x_hi);
        const T e_y_hi = horizontal_edge_integral(plane, height, width, bin.y_hi, bin.x_lo, bin.x_hi);
        accumulate_roi_grad(g, output[o], bin, e_x_lo, e_x_hi, e_y_lo, e_y_hi, ph, pw,
                            pooled_height, pooled_width, spatial_scale, acc);
      }
    }
    for (int j = 0; j < 4; ++j) partials[i * 4 + j] = acc[j];
  }
}

at::Tensor prroi_pool_forward_cuda(const at::Tensor& input_, const at::Tensor& rois_,
                                   double spatial_scale, int64_t pooled_height,
                                   int64_t pooled_width) {
  check_forward_args(input_, rois_, pooled_height, pooled_width);
  TORCH_CHECK(input_.is_cuda() && rois_.is_cuda() && input_.device() == rois_.device(),
              "prroi_pool (CUDA): input and rois must be on the same CUDA device");
  const c10::cuda::CUDAGuard device_guard(input_.device());
  const at::Tensor input = input_.contiguous();
  const at::Tensor rois = rois_.contiguous();
  at::Tensor output = at::empty({rois.size(0), input.size(1), pooled_height, pooled_width},
                                input.options());
  const int64_t total = output.numel();
  if (total == 0) return output;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "prroi_pool_forward_cuda", [&] {
    forward_kernel<scalar_t><<<num_blocks(total), kThreads, 0, stream>>>(
        total, input.data_ptr<scalar_t>(), rois.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(),
        static_cast<scalar_t>(spatial_scale), input.size(0), input.size(1), input.size(2),
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
  const at::Tensor rois = rois_.contiguous();
  const at::Tensor output = output_.contiguous();
  const int64_t num_rois = rois.size(0);

  at::Tensor grad_input = input_grad ? at::zeros_like(input) : at::empty({0}, input.options());
  at::Tensor grad_rois = rois_grad ? at::zeros_like(rois) : at::empty({0}, rois.options());
  if (grad_output.numel() == 0) return {grad_input, grad_rois};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "prroi_pool_backward_cuda", [&] {
    const scalar_t scale = static_cast<scalar_t>(spatial_scale);
    if (input_grad) {
      const int64_t total = grad_output.numel();
      backward_input_kernel<scalar_t><<<num_blocks(total), kThreads, 0, stream>>>(
          total, grad_output.data_ptr<scalar_t>(), rois.data_ptr<scalar_t>(),
          grad_input.data_ptr<scalar_t>(), scale, input.size(0), input.size(1), input.size(2),
          input.size(3), pooled_height, pooled_width);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (rois_grad) {
      const int64_t total = num_rois * pooled_height * pooled_width;
      at::Tensor partials = at::empty({num_rois, pooled_height * pooled_width, 4}, rois.options());
      backward_rois_kernel<scalar_t><<<num_blocks(total), kThreads, 0, stream>>>(
          total, grad_output.data_ptr<scalar_t>(), input.data_ptr<scalar_t>(),
          rois.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(), partials.data_ptr<scalar_t>(),
          scale, input.size(0), input.size(1), input.size(2), input.size(3), pooled_height,
          pooled_width);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      grad_rois.narrow(1, 1, 4).copy_(partials.sum(1));
    }
  });
  return {grad_input, grad_rois};
}

}  // namespace

TORCH_LIBRARY_IMPL(ioulab, CUDA, m) {
  m.impl("prroi_pool", &prroi_pool_forward_cuda);
  m.impl("prroi_pool_backward", &prroi_pool_backward_cuda);
}

}  // namespace prroi
}  // namespace ioulab
