// CPU implementation of PrRoIPool (float32 / float64 / float16 / bfloat16), built on the per-bin
// math of prroi_pool_math.h.
//
// Types: S (scalar_t) is the storage type of the feature map, grad_output and output; T =
// at::opmath_type<S> (float for the half types) is what every weight, sum and buffer uses. rois
// are converted to T up front; output, grad_input and the RoI partials are T tensors cast to
// the caller's dtype at the end, so nothing is accumulated in a half type.
//
// Shapes: input [N, C, H, W], rois [K, 5], output [K, C, PH, PW].
//
// Speed notes (why the loops look like this):
// * The bin integral is separable (see prroi_pool_math.h), so the per-pixel x / y weights of
//   every bin are computed once per RoI and shared by all channels. Per (RoI, channel) the
//   forward first reduces each touched row against the x weights of every bin column
//   (R[r, pw]) and then reduces R along y; only pixels a bin touches are visited.
// * Both passes run in parallel over (image, channel) planes, each task looping over the
//   image's RoIs: the plane stays in cache while the overlapping RoIs read it (a (RoI, channel)
//   order made the bench forward ~4x slower: every task touched a fresh 270 KB plane). In the
//   backward each task owns a whole grad_input plane -> no atomics and no per-thread copies of
//   grad_input. The RoI gradient of each (RoI, channel) goes to its own slot of a [K, C, 4]
//   buffer that is summed over channels at the end (deterministic).
#include "prroi_pool.h"
#include "prroi_pool_math.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace ioulab {
namespace prroi {
namespace {

// Per-bin pixel weights of one RoI along one axis.
template <typename T>
struct AxisWeights {
  std::vector<int64_t> first, count, offset;  // bin p covers pixels [first, first + count)
  std::vector<T> weight;                      // interval weights, bin p at weight[offset[p]...]
  std::vector<T> extent;                      // bin p's size (hi - lo of its rounded edges)
  // Point weights hat(x - i) at the bins' low / high edges, always two (pixel, weight) pairs per
  // bin: a pixel off the map gets weight 0 and an index clamped into the span, so the edge
  // loops have no branches or variable trip counts.
  std::vector<int64_t> lo_index, hi_index;
  std::vector<T> lo_weight, hi_weight;
  int64_t span_first = 0, span_last = -1;  // union of the bins' pixel ranges (empty if last < first)

  void clear() {
    first.clear(); count.clear(); offset.clear(); weight.clear(); extent.clear();
    lo_index.clear(); hi_index.clear(); lo_weight.clear(); hi_weight.clear();
    span_first = 0; span_last = -1;
  }

  // Appends the two (pixel, weight) pairs of the point x. Every pixel with a non-zero weight
  // lies in the pixel range of the bin the point bounds, hence in the span.
  void add_point(T x, int64_t size, std::vector<int64_t>& index, std::vector<T>& w) const {
    int64_t a, b;
    point_pixels(x, size, &a, &b);
    const int64_t base = safe_floor(x, size);
    for (int64_t i = base; i <= base + 1; ++i) {
      const bool inside = i >= a && i <= b && i >= span_first && i <= span_last;
      index.push_back(std::min(std::max(i, span_first), span_last));
      w.push_back(inside ? hat(x - T(i)) : T(0));
    }
  }
};

// Fills `axis` for bins [lo[p], hi[p]], p < P, on an axis of `size` pixels.
template <typename T>
void fill_axis(AxisWeights<T>& axis, const std::vector<T>& lo, const std::vector<T>& hi,
               int64_t size, bool with_edges) {
  axis.clear();
  int64_t span_first = size, span_last = -1;
  for (size_t p = 0; p < lo.size(); ++p) {
    axis.extent.push_back(hi[p] - lo[p]);
    int64_t a, b;
    interval_pixels(lo[p], hi[p], size, &a, &b);
    const int64_t n = std::max<int64_t>(b - a + 1, 0);
    axis.first.push_back(a);
    axis.count.push_back(n);
    axis.offset.push_back(static_cast<int64_t>(axis.weight.size()));
    for (int64_t i = 0; i < n; ++i) axis.weight.push_back(interval_weight(lo[p], hi[p], a + i));
    if (n > 0) {
      span_first = std::min(span_first, a);
      span_last = std::max(span_last, b);
    }
  }
  if (span_last >= span_first) {
    axis.span_first = span_first;
    axis.span_last = span_last;
  }
  if (with_edges && span_last >= span_first) {
    for (size_t p = 0; p < lo.size(); ++p) {
      axis.add_point(lo[p], size, axis.lo_index, axis.lo_weight);
      axis.add_point(hi[p], size, axis.hi_index, axis.hi_weight);
    }
  }
}

// Everything about one RoI that does not depend on the channel.
template <typename T>
struct RoiWeights {
  int64_t batch = 0;
  bool empty = true;  // zero-area bins or no bin touches the map: outputs 0, no gradient
  AxisWeights<T> x, y;
  std::vector<T> lo, hi;  // scratch

  void compute(const T* roi, T spatial_scale, int64_t pooled_height, int64_t pooled_width,
               int64_t height, int64_t width, bool with_edges) {
    batch = static_cast<int64_t>(roi[0]);
    lo.clear(); hi.clear();
    for (int64_t pw = 0; pw < pooled_width; ++pw) {
      const Bin<T> b = roi_bin(roi, spatial_scale, pooled_height, pooled_width, 0, pw);
      lo.push_back(b.x_lo);
      hi.push_back(b.x_hi);
    }
    fill_axis(x, lo, hi, width, with_edges);
    lo.clear(); hi.clear();
    for (int64_t ph = 0; ph < pooled_height; ++ph) {
      const Bin<T> b = roi_bin(roi, spatial_scale, pooled_height, pooled_width, ph, 0);
      lo.push_back(b.y_lo);
      hi.push_back(b.y_hi);
    }
    fill_axis(y, lo, hi, height, with_edges);
    const T x_extent = *std::max_element(x.extent.begin(), x.extent.end());
    const T y_extent = *std::max_element(y.extent.begin(), y.extent.end());
    empty = !(x_extent > T(0) && y_extent > T(0)) || x.span_last < x.span_first ||
            y.span_last < y.span_first;
  }

  // 1 / area of bin (ph, pw), 0 for a zero-area bin (which outputs 0 and has no gradient).
  T inv_area(int64_t ph, int64_t pw) const {
    const T area = x.extent[pw] * y.extent[ph];
    return area > T(0) ? T(1) / area : T(0);
  }

  Bin<T> bin(int64_t ph, int64_t pw) const {
    Bin<T> b{};
    b.width = x.extent[pw];
    b.height = y.extent[ph];
    b.area = b.width * b.height;
    return b;
  }
};

// rois: contiguous [K, 5]. A plain loop: tensor ops here cost more than the op on small inputs.
template <typename T>
void check_batch_indices(const T* rois, int64_t num_rois, int64_t num_images) {
  for (int64_t k = 0; k < num_rois; ++k) {
    const T b = rois[k * 5];
    TORCH_CHECK(b >= T(0) && b < T(num_images) && b == std::floor(b),
                "prroi_pool: rois[:, 0] must be integer batch indices in [0, ", num_images,
                "), got ", b, " in row ", k);
  }
}

// Grain (planes per task) of the (image, channel) loops: small problems run inline, because
// entering an OpenMP region costs tens of microseconds (far more when the cores are busy).
int64_t plane_grain(int64_t num_rois, int64_t num_images, int64_t pooled_height,
                    int64_t pooled_width) {
  constexpr int64_t kMinWorkPerTask = 1 << 15;  // ~ multiply-adds, i.e. some 10 us
  const int64_t work_per_plane =
      std::max<int64_t>(1, 16 * pooled_height * pooled_width * num_rois / std::max<int64_t>(num_images, 1));
  return std::max<int64_t>(1, kMinWorkPerTask / work_per_plane);
}

// R[r, pw] = sum_w wx[pw](w) * rows[r, w] for n_rows rows: the x half of the separable integral.
template <typename T, typename S>
void row_pass(const AxisWeights<T>& x, const S* rows, int64_t width, int64_t n_rows, T* R) {
  const int64_t pooled_width = static_cast<int64_t>(x.first.size());
  for (int64_t r = 0; r < n_rows; ++r) {
    const S* row = rows + r * width;
    for (int64_t pw = 0; pw < pooled_width; ++pw) {
      const T* wx = x.weight.data() + x.offset[pw];
      const S* px = row + x.first[pw];
      T s = T(0);
      for (int64_t j = 0; j < x.count[pw]; ++j) s += wx[j] * static_cast<T>(px[j]);
      R[r * pooled_width + pw] = s;
    }
  }
}

// out[PH, PW] of one (RoI, channel); row_buf is scratch.
template <typename T, typename S>
void forward_one(const RoiWeights<T>& rw, const S* plane, int64_t width, int64_t pooled_height,
                 int64_t pooled_width, std::vector<T>& row_buf, T* out) {
  const int64_t n_out = pooled_height * pooled_width;
  if (rw.empty) {
    std::fill(out, out + n_out, T(0));
    return;
  }
  const AxisWeights<T>& y = rw.y;
  const int64_t r0 = y.span_first;
  row_buf.resize((y.span_last - r0 + 1) * pooled_width);
  row_pass(rw.x, plane + r0 * width, width, y.span_last - r0 + 1, row_buf.data());
  for (int64_t ph = 0; ph < pooled_height; ++ph) {
    T* o = out + ph * pooled_width;
    std::fill(o, o + pooled_width, T(0));
    const T* wy = y.weight.data() + y.offset[ph];
    for (int64_t i = 0; i < y.count[ph]; ++i) {
      const T* R = row_buf.data() + (y.first[ph] + i - r0) * pooled_width;
      const T w = wy[i];
      for (int64_t pw = 0; pw < pooled_width; ++pw) o[pw] += w * R[pw];
    }
    for (int64_t pw = 0; pw < pooled_width; ++pw) o[pw] *= rw.inv_area(ph, pw);
  }
}

// Channel-independent weights of every RoI, computed once (parallel over RoIs).
template <typename T>
std::vector<RoiWeights<T>> all_roi_weights(const at::Tensor& rois, T spatial_scale,
                                           int64_t pooled_height, int64_t pooled_width,
                                           int64_t height, int64_t width, bool with_edges) {
  const T* rp = rois.data_ptr<T>();
  std::vector<RoiWeights<T>> weights(rois.size(0));
  at::parallel_for(0, rois.size(0), 64, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k)
      weights[k].compute(rp + k * 5, spatial_scale, pooled_height, pooled_width, height, width,
                         with_edges);
  });
  return weights;
}

// RoI indices grouped by image: rois_of_image[b] lists the RoIs of image b in order.
template <typename T>
std::vector<std::vector<int64_t>> group_by_image(const std::vector<RoiWeights<T>>& weights,
                                                 int64_t num_images) {
  std::vector<std::vector<int64_t>> groups(num_images);
  for (size_t k = 0; k < weights.size(); ++k) groups[weights[k].batch].push_back(k);
  return groups;
}

// rois and output are T tensors.
template <typename S, typename T>
void forward_impl(const at::Tensor& input, const at::Tensor& rois, at::Tensor& output,
                  T spatial_scale, int64_t pooled_height, int64_t pooled_width) {
  const int64_t num_images = input.size(0), channels = input.size(1);
  const int64_t height = input.size(2), width = input.size(3);
  const S* in = input.data_ptr<S>();
  T* out = output.data_ptr<T>();
  const int64_t n_out = pooled_height * pooled_width;
  check_batch_indices(rois.data_ptr<T>(), rois.size(0), num_images);
  const std::vector<RoiWeights<T>> weights = all_roi_weights(
      rois, spatial_scale, pooled_height, pooled_width, height, width, false);
  const std::vector<std::vector<int64_t>> rois_of_image = group_by_image(weights, num_images);
  // One task per (image, channel) plane, looping over that image's RoIs: the plane stays in
  // cache while the (heavily overlapping) RoIs read it. Each output is written by one task.
  const int64_t grain = plane_grain(rois.size(0), num_images, pooled_height, pooled_width);
  at::parallel_for(0, num_images * channels, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> row_buf;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / channels, c = task % channels;
      const S* plane = in + task * height * width;
      for (int64_t k : rois_of_image[b])
        forward_one(weights[k], plane, width, pooled_height, pooled_width, row_buf,
                    out + (k * channels + c) * n_out);
    }
  });
}

// Adds d(sum gout * out)/d plane for one (RoI, channel); col_buf is scratch.
template <typename T, typename S>
void backward_input_one(const RoiWeights<T>& rw, const S* gout, int64_t width,
                        int64_t pooled_height, int64_t pooled_width, std::vector<T>& col_buf,
                        T* grad_plane) {
  const AxisWeights<T>& x = rw.x;
  const AxisWeights<T>& y = rw.y;
  const int64_t r0 = y.span_first, n_rows = y.span_last - y.span_first + 1;
  // G[r, pw] = sum_ph wy[ph](r) * gout[ph, pw] / area: the transpose of the forward's y pass.
  // The last pooled_width entries of col_buf hold gout[ph, :] / area.
  col_buf.assign((n_rows + 1) * pooled_width, T(0));
  T* g = col_buf.data() + n_rows * pooled_width;
  for (int64_t ph = 0; ph < pooled_height; ++ph) {
    for (int64_t pw = 0; pw < pooled_width; ++pw)
      g[pw] = static_cast<T>(gout[ph * pooled_width + pw]) * rw.inv_area(ph, pw);
    const T* wy = y.weight.data() + y.offset[ph];
    for (int64_t i = 0; i < y.count[ph]; ++i) {
      T* G = col_buf.data() + (y.first[ph] + i - r0) * pooled_width;
      const T w = wy[i];
      for (int64_t pw = 0; pw < pooled_width; ++pw) G[pw] += w * g[pw];
    }
  }
  for (int64_t r = 0; r < n_rows; ++r) {
    T* row = grad_plane + (r0 + r) * width;
    const T* G = col_buf.data() + r * pooled_width;
    for (int64_t pw = 0; pw < pooled_width; ++pw) {
      const T g = G[pw];
      const T* wx = x.weight.data() + x.offset[pw];
      T* px = row + x.first[pw];
      for (int64_t j = 0; j < x.count[pw]; ++j) px[j] += g * wx[j];
    }
  }
}

// Adds the RoI gradient (x1, y1, x2, y2) of one (RoI, channel) to roi_grad[4].
// Needs the line integrals of f along the four edges of every bin:
//   vertical edge at x:   sum_r wy(r) * f(x, r), with f(x, r) from the two pixels around x;
//   horizontal edge at y: sum_{2 rows r around y} hat(y - r) * R[r, pw], R the forward's row pass.
// With S != T the bin outputs are recomputed from R in T instead of read from the S-rounded
// `out` (the Leibniz rule's height * out - edge integral would amplify that rounding).
template <typename T, typename S>
void backward_rois_one(const RoiWeights<T>& rw, const S* plane, const S* gout, const S* out,
                       int64_t width, int64_t pooled_height, int64_t pooled_width,
                       T spatial_scale, std::vector<T>& buf, T* roi_grad) {
  // An empty RoI has zero area or lies in the zero region, where every edge integral and
  // output is 0: no gradient.
  if (rw.empty) return;
  const AxisWeights<T>& x = rw.x;
  const AxisWeights<T>& y = rw.y;
  const int64_t r0 = y.span_first, n_rows = y.span_last - y.span_first + 1;
  // buf: R, P_lo, P_hi, each [n_rows, PW]; P = the rows interpolated at the bins' x edges.
  buf.resize(3 * n_rows * pooled_width);
  T* R = buf.data();
  T* P_lo = R + n_rows * pooled_width;
  T* P_hi = P_lo + n_rows * pooled_width;
  row_pass(x, plane + r0 * width, width, n_rows, R);
  for (int64_t r = 0; r < n_rows; ++r) {
    const S* row = plane + (r0 + r) * width;
    for (int64_t pw = 0; pw < pooled_width; ++pw) {
      P_lo[r * pooled_width + pw] =
          x.lo_weight[2 * pw] * static_cast<T>(row[x.lo_index[2 * pw]]) +
          x.lo_weight[2 * pw + 1] * static_cast<T>(row[x.lo_index[2 * pw + 1]]);
      P_hi[r * pooled_width + pw] =
          x.hi_weight[2 * pw] * static_cast<T>(row[x.hi_index[2 * pw]]) +
          x.hi_weight[2 * pw + 1] * static_cast<T>(row[x.hi_index[2 * pw + 1]]);
    }
  }
  for (int64_t ph = 0; ph < pooled_height; ++ph) {
    const T* wy = y.weight.data() + y.offset[ph];
    const int64_t first = y.first[ph] - r0;
    const T* lo0 = R + (y.lo_index[2 * ph] - r0) * pooled_width;
    const T* lo1 = R + (y.lo_index[2 * ph + 1] - r0) * pooled_width;
    const T* hi0 = R + (y.hi_index[2 * ph] - r0) * pooled_width;
    const T* hi1 = R + (y.hi_index[2 * ph + 1] - r0) * pooled_width;
    for (int64_t pw = 0; pw < pooled_width; ++pw) {
      T e_x_lo = T(0), e_x_hi = T(0), integral = T(0);
      for (int64_t i = 0; i < y.count[ph]; ++i) {
        e_x_lo += wy[i] * P_lo[(first + i) * pooled_width + pw];
        e_x_hi += wy[i] * P_hi[(first + i) * pooled_width + pw];
        if constexpr (!std::is_same<S, T>::value)
          integral += wy[i] * R[(first + i) * pooled_width + pw];
      }
      const T e_y_lo = y.lo_weight[2 * ph] * lo0[pw] + y.lo_weight[2 * ph + 1] * lo1[pw];
      const T e_y_hi = y.hi_weight[2 * ph] * hi0[pw] + y.hi_weight[2 * ph + 1] * hi1[pw];
      const int64_t o = ph * pooled_width + pw;
      T out_o;
      if constexpr (std::is_same<S, T>::value) {
        out_o = out[o];
      } else {
        out_o = integral * rw.inv_area(ph, pw);
      }
      accumulate_roi_grad(static_cast<T>(gout[o]), out_o, rw.bin(ph, pw), e_x_lo, e_x_hi, e_y_lo, e_y_hi, ph, pw,
                          pooled_height, pooled_width, spatial_scale, roi_grad);
    }
  }
}

// rois, grad_input and roi_partials are T tensors; grad_output, input and output S tensors.
template <typename S, typename T>
void backward_impl(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& rois,
                   const at::Tensor& output, T spatial_scale, int64_t pooled_height,
                   int64_t pooled_width, at::Tensor* grad_input, at::Tensor* roi_partials) {
  const int64_t num_images = input.size(0), channels = input.size(1);
  const int64_t height = input.size(2), width = input.size(3);
  const int64_t n_out = pooled_height * pooled_width;
  const bool rois_grad = roi_partials != nullptr;
  check_batch_indices(rois.data_ptr<T>(), rois.size(0), num_images);
  const std::vector<RoiWeights<T>> weights = all_roi_weights(
      rois, spatial_scale, pooled_height, pooled_width, height, width, rois_grad);
  const std::vector<std::vector<int64_t>> rois_of_image = group_by_image(weights, num_images);

  const S* in = input.data_ptr<S>();
  const S* gout = grad_output.data_ptr<S>();
  const S* out = output.data_ptr<S>();
  T* gin = grad_input ? grad_input->data_ptr<T>() : nullptr;
  T* partial = rois_grad ? roi_partials->data_ptr<T>() : nullptr;

  const int64_t grain = plane_grain(rois.size(0), num_images, pooled_height, pooled_width);
  at::parallel_for(0, num_images * channels, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> buf;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / channels, c = task % channels;
      const S* plane = in + task * height * width;
      // grad_input comes uninitialised: zeroing the plane here keeps it in cache for the adds.
      if (gin != nullptr) std::fill(gin + task * height * width, gin + (task + 1) * height * width, T(0));
      for (int64_t k : rois_of_image[b]) {
        const RoiWeights<T>& rw = weights[k];
        const int64_t o = (k * channels + c) * n_out;
        if (gin != nullptr && !rw.empty)
          backward_input_one(rw, gout + o, width, pooled_height, pooled_width, buf,
                             gin + task * height * width);
        if (rois_grad)
          backward_rois_one(rw, plane, gout + o, out + o, width, pooled_height, pooled_width,
                            spatial_scale, buf, partial + (k * channels + c) * 4);
      }
    }
  });
}

at::Tensor prroi_pool_forward_cpu(const at::Tensor& input_, const at::Tensor& rois_,
                                  double spatial_scale, int64_t pooled_height,
                                  int64_t pooled_width) {
  check_forward_args(input_, rois_, pooled_height, pooled_width);
  TORCH_CHECK(input_.device().is_cpu() && rois_.device().is_cpu(),
              "prroi_pool (CPU): input and rois must be CPU tensors");
  const at::Tensor input = input_.contiguous();
  const at::ScalarType compute = compute_dtype(input);
  const at::Tensor rois = rois_.to(compute).contiguous();
  at::Tensor output = at::empty({rois.size(0), input.size(1), pooled_height, pooled_width},
                                input.options().dtype(compute));
  if (output.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                    "prroi_pool_forward_cpu", [&] {
      using T = at::opmath_type<scalar_t>;
      forward_impl<scalar_t, T>(input, rois, output, static_cast<T>(spatial_scale), pooled_height,
                                pooled_width);
    });
  }
  return output.to(input.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> prroi_pool_backward_cpu(
    const at::Tensor& grad_output_, const at::Tensor& input_, const at::Tensor& rois_,
    const at::Tensor& output_, double spatial_scale, int64_t pooled_height, int64_t pooled_width,
    bool input_grad, bool rois_grad) {
  check_backward_args(grad_output_, input_, rois_, output_, pooled_height, pooled_width);
  TORCH_CHECK(grad_output_.device().is_cpu() && input_.device().is_cpu() &&
                  rois_.device().is_cpu() && output_.device().is_cpu(),
              "prroi_pool_backward (CPU): all tensors must be CPU tensors");
  const at::Tensor grad_output = grad_output_.contiguous();
  const at::Tensor input = input_.contiguous();
  const at::ScalarType compute = compute_dtype(input);
  const at::Tensor rois = rois_.to(compute).contiguous();
  const at::Tensor output = output_.contiguous();
  const int64_t num_rois = rois.size(0), channels = input.size(1);

  at::Tensor grad_rois = rois_grad ? at::zeros_like(rois_) : at::empty({0}, rois_.options());
  if ((!input_grad && !rois_grad) || grad_output.numel() == 0) {
    return {input_grad ? at::zeros_like(input) : at::empty({0}, input.options()), grad_rois};
  }
  // Filled plane by plane in backward_impl (every plane is visited), in the compute dtype.
  at::Tensor grad_input = input_grad
      ? at::empty(input.sizes(), input.options().dtype(compute))
      : at::empty({0}, input.options());
  at::Tensor partials;
  if (rois_grad) partials = at::zeros({num_rois, channels, 4}, rois.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "prroi_pool_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    backward_impl<scalar_t, T>(grad_output, input, rois, output, static_cast<T>(spatial_scale),
                               pooled_height, pooled_width, input_grad ? &grad_input : nullptr,
                               rois_grad ? &partials : nullptr);
  });
  // Sum over channels outside the parallel region; column 0 (batch index) stays 0.
  if (rois_grad) grad_rois.narrow(1, 1, 4).copy_(partials.sum(1));
  return {grad_input.to(input.scalar_type()), grad_rois};
}

}  // namespace

TORCH_LIBRARY_IMPL(ioulab, CPU, m) {
  m.impl("prroi_pool", &prroi_pool_forward_cpu);
  m.impl("prroi_pool_backward", &prroi_pool_backward_cpu);
}

}  // namespace prroi
}  // namespace ioulab
