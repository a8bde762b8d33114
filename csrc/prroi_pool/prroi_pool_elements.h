// Per-element bodies of the CUDA kernels (prroi_pool_cuda.cu), host- and device-callable so that
// a CPU test (tests/detector/ops/prroi_elements_probe.cpp) runs exactly this code serially.
//
// Shapes: input [N, C, H, W], rois [K, 5], output / grad_output [K, C, PH, PW] (contiguous);
// element i of the forward / feature gradient is output index (k, c, ph, pw); element i of the
// RoI gradient is (k, ph, pw) and writes partials[i, 4] (to be summed over the PH * PW bins).
//
// Types (see prroi_pool_math.h): S is the storage type of input / grad_output / output, T the
// compute type (float for Half / BFloat16). rois, grad_input and partials are T buffers: the
// feature gradient is accumulated (atomically on the GPU) in T and cast to S by the caller.
#pragma once

#include <type_traits>

#include "prroi_pool_math.h"

namespace ioulab {
namespace prroi {

template <typename T>
PRROI_HOST_DEVICE bool valid_image(const T* roi, int64_t num_images, int64_t* b) {
  // Out-of-range batch indices pool nothing (the CPU op rejects them; checking here would
  // need a device synchronisation).
  if (!(roi[0] >= T(0) && roi[0] < T(num_images))) return false;
  *b = static_cast<int64_t>(roi[0]);
  return true;
}

// Output element i = (k, c, ph, pw).
template <typename T, typename S>
PRROI_HOST_DEVICE T forward_element(int64_t i, const S* input, const T* rois, T spatial_scale,
                                    int64_t num_images, int64_t channels, int64_t height,
                                    int64_t width, int64_t pooled_height, int64_t pooled_width) {
  const int64_t pw = i % pooled_width;
  const int64_t ph = (i / pooled_width) % pooled_height;
  const int64_t c = (i / (pooled_width * pooled_height)) % channels;
  const int64_t k = i / (pooled_width * pooled_height * channels);
  const T* roi = rois + k * 5;
  const Bin<T> bin = roi_bin(roi, spatial_scale, pooled_height, pooled_width, ph, pw);
  int64_t b;
  if (!(bin.area > T(0)) || !valid_image(roi, num_images, &b)) return T(0);
  const S* plane = input + (b * channels + c) * height * width;
  return bin_integral(plane, height, width, bin) / bin.area;
}

// Adds grad_output[i] * d output[i] / d input to grad_input with add(address, value).
template <typename T, typename S, typename Add>
PRROI_HOST_DEVICE void backward_input_element(int64_t i, const S* grad_output, const T* rois,
                                              T* grad_input, T spatial_scale, int64_t num_images,
                                              int64_t channels, int64_t height, int64_t width,
                                              int64_t pooled_height, int64_t pooled_width,
                                              const Add& add) {
  const int64_t pw = i % pooled_width;
  const int64_t ph = (i / pooled_width) % pooled_height;
  const int64_t c = (i / (pooled_width * pooled_height)) % channels;
  const int64_t k = i / (pooled_width * pooled_height * channels);
  const T* roi = rois + k * 5;
  const Bin<T> bin = roi_bin(roi, spatial_scale, pooled_height, pooled_width, ph, pw);
  int64_t b;
  if (!(bin.area > T(0)) || !valid_image(roi, num_images, &b)) return;
  const T g = static_cast<T>(grad_output[i]) / bin.area;
  if (g == T(0)) return;
  T* plane = grad_input + (b * channels + c) * height * width;
  int64_t h0, h1, w0, w1;
  interval_pixels(bin.y_lo, bin.y_hi, height, &h0, &h1);
  interval_pixels(bin.x_lo, bin.x_hi, width, &w0, &w1);
  for (int64_t h = h0; h <= h1; ++h) {
    const T gy = g * interval_weight(bin.y_lo, bin.y_hi, h);
    for (int64_t w = w0; w <= w1; ++w)
      add(plane + h * width + w, gy * interval_weight(bin.x_lo, bin.x_hi, w));
  }
}

// Element i = (k, ph, pw): this bin's share of the RoI gradient, summed over channels, written to
// partials[4 * i .. 4 * i + 3] as (x1, y1, x2, y2).
// With S != T the bin's output is recomputed in T: the stored S value carries a relative error
// of S's epsilon, which the Leibniz rule (height * out - edge integral) amplifies for narrow bins.
template <typename T, typename S>
PRROI_HOST_DEVICE void backward_rois_element(int64_t i, const S* grad_output, const S* input,
                                             const T* rois, const S* output, T* partials,
                                             T spatial_scale, int64_t num_images, int64_t channels,
                                             int64_t height, int64_t width, int64_t pooled_height,
                                             int64_t pooled_width) {
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
      const T g = static_cast<T>(grad_output[o]);
      if (g == T(0)) continue;
      const S* plane = input + (b * channels + c) * height * width;
      T out;
      if constexpr (std::is_same<S, T>::value) {
        out = output[o];
      } else {
        out = bin_integral(plane, height, width, bin) / bin.area;
      }
      const T e_x_lo = vertical_edge_integral(plane, height, width, bin.x_lo, bin.y_lo, bin.y_hi);
      const T e_x_hi = vertical_edge_integral(plane, height, width, bin.x_hi, bin.y_lo, bin.y_hi);
      const T e_y_lo = horizontal_edge_integral(plane, height, width, bin.y_lo, bin.x_lo, bin.x_hi);
      const T e_y_hi = horizontal_edge_integral(plane, height, width, bin.y_hi, bin.x_lo, bin.x_hi);
      accumulate_roi_grad(g, out, bin, e_x_lo, e_x_hi, e_y_lo, e_y_hi, ph, pw, pooled_height,
                          pooled_width, spatial_scale, acc);
    }
  }
  for (int j = 0; j < 4; ++j) partials[i * 4 + j] = acc[j];
}

}  // namespace prroi
}  // namespace ioulab
