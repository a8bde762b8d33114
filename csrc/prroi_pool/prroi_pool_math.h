// Per-bin math of Precise RoI Pooling (Jiang et al., "Acquisition of Localization Confidence for
// Accurate Object Detection", ECCV 2018), written once for the CPU and the CUDA kernels.
//
// Glossary (all coordinates in feature-map pixels, i.e. after spatial_scale):
//   H, W    feature map height / width; pixel (h, w) holds its value at the integer point (x=w, y=h)
//   PH, PW  output bins per RoI along y / x
//   f(x, y) bilinear interpolation of the pixels, 0 outside the map (so it decays linearly to 0
//           over the one-pixel band around the map)
//   bin     [x_lo, x_hi] x [y_lo, y_hi]; out = (1/area) * integral of f over the bin (0 if area 0)
//
// Why a separable form: the bilinear map is f(x, y) = sum_{h,w} F[h, w] * hat(x - w) * hat(y - h)
// with hat(t) = max(0, 1 - |t|). Integrating over a box therefore gives
//     integral = sum_{h,w} F[h, w] * Iy(h) * Ix(w),   Ix(w) = integral_{x_lo}^{x_hi} hat(x - w) dx,
// which is exactly the sum of the closed-form integrals of the bilinear patches of the unit cells
// the bin touches, rearranged per pixel. Ix / Iy are integrals of the continuous hat, so the
// output is C1 in the bin edges and the Leibniz-rule gradients below hold also on grid lines.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PRROI_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PRROI_HOST_DEVICE inline
#endif

namespace ioulab {
namespace prroi {

// hat(t): the weight pixel i has in f at a point x = i + t (linear interpolation along one axis).
template <typename T>
PRROI_HOST_DEVICE T hat(T t) {
  const T a = T(1) - (t < T(0) ? -t : t);
  return a > T(0) ? a : T(0);
}

// Integral over [lo, hi] of pixel i's interpolation weight along one axis. The product of the
// x and y weights divided by the bin area is the feature-gradient coefficient of pixel (h, w).
// Mathematically Hc(hi - i) - Hc(lo - i), Hc the antiderivative of hat; computed per linear
// piece of the hat as length * hat(midpoint) instead, which has no cancellation for narrow bins
// (the difference form lost ~3e-5 absolute in float32 on 0.02-pixel bins).
template <typename T>
PRROI_HOST_DEVICE T interval_weight(T lo, T hi, int64_t i) {
  const T t0 = lo - T(i), t1 = hi - T(i);
  // Rising piece t in [-1, 0]: hat = 1 + t.
  const T a0 = t0 < T(-1) ? T(-1) : (t0 > T(0) ? T(0) : t0);
  const T b0 = t1 < T(-1) ? T(-1) : (t1 > T(0) ? T(0) : t1);
  // Falling piece t in [0, 1]: hat = 1 - t.
  const T a1 = t0 < T(0) ? T(0) : (t0 > T(1) ? T(1) : t0);
  const T b1 = t1 < T(0) ? T(0) : (t1 > T(1) ? T(1) : t1);
  return (b0 - a0) * (T(1) + T(0.5) * (a0 + b0)) + (b1 - a1) * (T(1) - T(0.5) * (a1 + b1));
}

// floor / ceil of a coordinate as a pixel index, with the coordinate first clamped to
// [-2, size + 1] (NaN -> the low / high end) so that huge, infinite or NaN RoIs cannot produce
// out-of-range pixel indices.
template <typename T>
PRROI_HOST_DEVICE int64_t safe_floor(T v, int64_t size) {
  const T c = !(v >= T(-2)) ? T(-2) : (v > T(size + 1) ? T(size + 1) : v);
  return static_cast<int64_t>(floor(c));
}

template <typename T>
PRROI_HOST_DEVICE int64_t safe_ceil(T v, int64_t size) {
  const T c = !(v <= T(size + 1)) ? T(size + 1) : (v < T(-2) ? T(-2) : v);
  return static_cast<int64_t>(ceil(c));
}

// Pixels with a non-zero weight over [lo, hi]: i in [floor(lo), ceil(hi)], clipped to the map.
// Sets last < first when none is in the map.
template <typename T>
PRROI_HOST_DEVICE void interval_pixels(T lo, T hi, int64_t size, int64_t* first, int64_t* last) {
  const int64_t a = safe_floor(lo, size);
  const int64_t b = safe_ceil(hi, size);
  *first = a < 0 ? 0 : a;
  *last = b > size - 1 ? size - 1 : b;
}

// The (at most two) pixels with non-zero weight hat(x - i) at a point x, clipped to the map.
template <typename T>
PRROI_HOST_DEVICE void point_pixels(T x, int64_t size, int64_t* first, int64_t* last) {
  const int64_t a = safe_floor(x, size);
  *first = a < 0 ? 0 : a;
  *last = a + 1 > size - 1 ? size - 1 : a + 1;
}

template <typename T>
struct Bin {
  T x_lo, x_hi, y_lo, y_hi;  // edges in feature-map pixels
  T width, height, area;     // width/height >= 0; area == 0 means "outputs 0, gradients 0"
};

// Bin (ph, pw) of a RoI row (batch_index, x1, y1, x2, y2) given in input-image coordinates.
template <typename T>
PRROI_HOST_DEVICE Bin<T> roi_bin(const T* roi, T spatial_scale, int64_t pooled_height,
                                 int64_t pooled_width, int64_t ph, int64_t pw) {
  const T x1 = roi[1] * spatial_scale;
  const T y1 = roi[2] * spatial_scale;
  const T x2 = roi[3] * spatial_scale;
  const T y2 = roi[4] * spatial_scale;
  // Inverted RoIs (x2 < x1) get zero-size bins, like the official op.
  const T roi_w = x2 - x1 > T(0) ? x2 - x1 : T(0);
  const T roi_h = y2 - y1 > T(0) ? y2 - y1 : T(0);
  const T bin_w = roi_w / T(pooled_width);
  const T bin_h = roi_h / T(pooled_height);
  Bin<T> bin;
  bin.x_lo = x1 + bin_w * T(pw);
  bin.x_hi = bin.x_lo + bin_w;
  bin.y_lo = y1 + bin_h * T(ph);
  bin.y_hi = bin.y_lo + bin_h;
  // Width and area from the rounded edges, so that the pixel weights of a bin inside the map sum
  // to exactly its area (a constant map pools to that constant also in float32).
  bin.width = bin.x_hi - bin.x_lo;
  bin.height = bin.y_hi - bin.y_lo;
  bin.area = bin.width * bin.height;
  return bin;
}

// integral of f over the bin (not divided by the area); plane is one channel, [H, W] contiguous.
template <typename T, typename S>
PRROI_HOST_DEVICE T bin_integral(const S* plane, int64_t height, int64_t width, const Bin<T>& bin) {
  int64_t h0, h1, w0, w1;
  interval_pixels(bin.y_lo, bin.y_hi, height, &h0, &h1);
  interval_pixels(bin.x_lo, bin.x_hi, width, &w0, &w1);
  T sum = T(0);
  for (int64_t h = h0; h <= h1; ++h) {
    T row = T(0);
    for (int64_t w = w0; w <= w1; ++w)
      row += interval_weight(bin.x_lo, bin.x_hi, w) * static_cast<T>(plane[h * width + w]);
    sum += interval_weight(bin.y_lo, bin.y_hi, h) * row;
  }
  return sum;
}

// integral_{y_lo}^{y_hi} f(x, y) dy: the line integral along a vertical bin edge at x. Exact,
// because f is linear in y inside each cell.
template <typename T, typename S>
PRROI_HOST_DEVICE T vertical_edge_integral(const S* plane, int64_t height, int64_t width, T x,
                                           T y_lo, T y_hi) {
  int64_t h0, h1, w0, w1;
  interval_pixels(y_lo, y_hi, height, &h0, &h1);
  point_pixels(x, width, &w0, &w1);
  T sum = T(0);
  for (int64_t h = h0; h <= h1; ++h) {
    T value = T(0);
    for (int64_t w = w0; w <= w1; ++w)
      value += hat(x - T(w)) * static_cast<T>(plane[h * width + w]);
    sum += interval_weight(y_lo, y_hi, h) * value;
  }
  return sum;
}

// integral_{x_lo}^{x_hi} f(x, y) dx along a horizontal bin edge at y.
template <typename T, typename S>
PRROI_HOST_DEVICE T horizontal_edge_integral(const S* plane, int64_t height, int64_t width, T y,
                                             T x_lo, T x_hi) {
  int64_t h0, h1, w0, w1;
  point_pixels(y, height, &h0, &h1);
  interval_pixels(x_lo, x_hi, width, &w0, &w1);
  T sum = T(0);
  for (int64_t h = h0; h <= h1; ++h) {
    T row = T(0);
    for (int64_t w = w0; w <= w1; ++w)
      row += interval_weight(x_lo, x_hi, w) * static_cast<T>(plane[h * width + w]);
    sum += hat(y - T(h)) * row;
  }
  return sum;
}

// Gradient of one bin's output wrt the RoI (x1, y1, x2, y2), times the upstream gradient.
//   out          the bin's output (integral / area)
//   edge_x_lo..  line integrals of f along the bin's four edges
//   roi_grad     the 4 values are ADDED to (x1, y1, x2, y2)
// Leibniz rule: d out / d x_lo = (-integral f(x_lo, y) dy + height * out) / area, etc.; the bin
// edges are x_lo = X1 + pw * (X2 - X1) / PW and x_hi = X1 + (pw + 1) * (X2 - X1) / PW, both
// times spatial_scale. A zero-area bin contributes nothing.
template <typename T>
PRROI_HOST_DEVICE void accumulate_roi_grad(T grad_out, T out, const Bin<T>& bin, T edge_x_lo,
                                           T edge_x_hi, T edge_y_lo, T edge_y_hi, int64_t ph,
                                           int64_t pw, int64_t pooled_height, int64_t pooled_width,
                                           T spatial_scale, T* roi_grad) {
  if (!(bin.area > T(0))) return;
  const T g = grad_out * spatial_scale / bin.area;
  const T d_x_lo = g * (bin.height * out - edge_x_lo);
  const T d_x_hi = g * (edge_x_hi - bin.height * out);
  const T d_y_lo = g * (bin.width * out - edge_y_lo);
  const T d_y_hi = g * (edge_y_hi - bin.width * out);
  const T a_lo = T(pw) / T(pooled_width);  // d x_lo / d X2 (and 1 - a_lo = d x_lo / d X1)
  const T a_hi = T(pw + 1) / T(pooled_width);
  const T b_lo = T(ph) / T(pooled_height);
  const T b_hi = T(ph + 1) / T(pooled_height);
  roi_grad[0] += d_x_lo * (T(1) - a_lo) + d_x_hi * (T(1) - a_hi);
  roi_grad[1] += d_y_lo * (T(1) - b_lo) + d_y_hi * (T(1) - b_hi);
  roi_grad[2] += d_x_lo * a_lo + d_x_hi * a_hi;
  roi_grad[3] += d_y_lo * b_lo + d_y_hi * b_hi;
}

}  // namespace prroi
}  // namespace ioulab
