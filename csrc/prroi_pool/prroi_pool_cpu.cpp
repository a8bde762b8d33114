// CPU implementation of PrRoIPool (float32 / float64), built on the per-bin math of
// prroi_pool_math.h.
//
// Shapes: input [N, C, H, W], rois [K, 5], output [K, C, PH, PW].
//
// Speed notes (why the loops look like this):
// * The bin integral is separable (see prroi_pool_math.h), so the per-pixel x / y weights of
//   every bin are computed once per RoI and shared by all channels. Per (RoI, channel) the
//   forward first reduces each touched row against the x weights of every bin column
//   (R[r, pw]) and then reduces R along y; only pixels a bin touches are visited.
// * Forward: parallel over (RoI, channel), each output written by one thread.
// * Backward: parallel over (image, channel) so that each thread owns a whole grad_input plane
//   -> no atomics and no per-thread copies of grad_input. The RoI gradient of each (RoI,
//   channel) goes to its own slot of a [K, C, 4] buffer that is summed over channels at the end
//   (deterministic).
#include "prroi_pool.h"
#include "prroi_pool_math.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace ioulab {
namespace prroi {
namespace {

// Per-bin pixel weights of one RoI along one axis.
template <typename T>
struct AxisWeights {
  std::vector<int64_t> first, count, offset;  // bin p covers pixels [first, first + count)
  std::vector<T> weight;                      // interval weights, bin p at weight[offset[p]...]
  // Point weights hat(x - i) at the bins' low / high edges: pixels first + {0, 1}; count <= 2.
  std::vector<int64_t> lo_first, lo_count, hi_first, hi_count;
  std::vector<T> lo_weight, hi_weight;  // 2 per bin
  int64_t span_first = 0, span_last = -1;  // union of the bins' pixel ranges (empty if last < first)

  void clear() {
    first.clear(); count.clear(); offset.clear(); weight.clear();
    lo_first.clear(); lo_count.clear(); hi_first.clear(); hi_count.clear();
    lo_weight.clear(); hi_weight.clear();
    span_first = 0; span_last = -1;
  }
};

template <typename T>
void add_point(T x, int64_t size, std::vector<int64_t>& first, std::vector<int64_t>& count,
               std::vector<T>& weight) {
  int64_t a, b;
  point_pixels(x, size, &a, &b);
  const int64_t n = std::max<int64_t>(b - a + 1, 0);
  first.push_back(a);
  count.push_back(n);
  weight.push_back(n > 0 ? hat(x - T(a)) : T(0));
  weight.push_back(n > 1 ? hat(x - T(a + 1)) : T(0));
}

// Fills `axis` for bins [lo[p], hi[p]], p < P, on an axis of `size` pixels.
template <typename T>
void fill_axis(AxisWeights<T>& axis, const std::vector<T>& lo, const std::vector<T>& hi,
               int64_t size, bool with_edges) {
  axis.clear();
  int64_t span_first = size, span_last = -1;
  for (size_t p = 0; p < lo.size(); ++p) {
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
    if (with_edges) {
      add_point(lo[p], size, axis.lo_first, axis.lo_count, axis.lo_weight);
      add_point(hi[p], size, axis.hi_first, axis.hi_count, axis.hi_weight);
    }
  }
  if (span_last >= span_first) {
    axis.span_first = span_first;
    axis.span_last = span_last;
  }
}

// Everything about one RoI that does not depend on the channel.
template <typename T>
struct RoiWeights {
  int64_t batch = 0;
  bool empty = true;  // zero-area bins or no bin touches the map: outputs 0, no feature gradient
  Bin<T> bin{};       // width / height / area of every bin of this RoI
  AxisWeights<T> x, y;
  std::vector<T> lo, hi;  // scratch

  void compute(const T* roi, T spatial_scale, int64_t pooled_height, int64_t pooled_width,
               int64_t height, int64_t width, bool with_edges) {
    batch = static_cast<int64_t>(roi[0]);
    bin = roi_bin(roi, spatial_scale, pooled_height, pooled_width, 0, 0);
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
    empty = !(bin.area > T(0)) || x.span_last < x.span_first || y.span_last < y.span_first;
  }
};

void check_batch_indices(const at::Tensor& rois, int64_t num_images) {
  if (rois.size(0) == 0) return;
  const at::Tensor idx = rois.select(1, 0);
  // Tensor ops outside the parallel region; one cheap pass over K values.
  const bool ok = (idx >= 0).all().item<bool>() && (idx < num_images).all().item<bool>() &&
                  (idx == idx.floor()).all().item<bool>();
  TORCH_CHECK(ok, "prroi_pool: rois[:, 0] must be integer batch indices in [0, ", num_images, ")");
}

// out[PH, PW] of one (RoI, channel); row_buf is scratch.
template <typename T>
void forward_one(const RoiWeights<T>& rw, const T* plane, int64_t width, int64_t pooled_height,
                 int64_t pooled_width, std::vector<T>& row_buf, T* out) {
  const int64_t n_out = pooled_height * pooled_width;
  if (rw.empty) {
    std::fill(out, out + n_out, T(0));
    return;
  }
  const AxisWeights<T>& x = rw.x;
  const AxisWeights<T>& y = rw.y;
  const int64_t r0 = y.span_first, n_rows = y.span_last - y.span_first + 1;
  row_buf.resize(n_rows * pooled_width);
  for (int64_t r = 0; r < n_rows; ++r) {
    const T* row = plane + (r0 + r) * width;
    T* R = row_buf.data() + r * pooled_width;
    for (int64_t pw = 0; pw < pooled_width; ++pw) {
      const T* wx = x.weight.data() + x.offset[pw];
      const T* px = row + x.first[pw];
      T s = T(0);
      for (int64_t j = 0; j < x.count[pw]; ++j) s += wx[j] * px[j];
      R[pw] = s;
    }
  }
  const T inv_area = T(1) / rw.bin.area;
  for (int64_t ph = 0; ph < pooled_height; ++ph) {
    T* o = out + ph * pooled_width;
    std::fill(o, o + pooled_width, T(0));
    const T* wy = y.weight.data() + y.offset[ph];
    for (int64_t i = 0; i < y.count[ph]; ++i) {
      const T* R = row_buf.data() + (y.first[ph] + i - r0) * pooled_width;
      const T w = wy[i] * inv_area;
      for (int64_t pw = 0; pw < pooled_width; ++pw) o[pw] += w * R[pw];
    }
  }
}

template <typename T>
void forward_impl(const at::Tensor& input, const at::Tensor& rois, at::Tensor& output,
                  T spatial_scale, int64_t pooled_height, int64_t pooled_width) {
  const int64_t channels = input.size(1), height = input.size(2), width = input.size(3);
  const int64_t num_rois = rois.size(0);
  const T* in = input.data_ptr<T>();
  const T* rp = rois.data_ptr<T>();
  T* out = output.data_ptr<T>();
  const int64_t n_out = pooled_height * pooled_width;
  // Tasks are (RoI, channel) with the channel fastest, so a thread's contiguous chunk spans few
  // RoIs and the channel-independent weights are recomputed only when the RoI changes.
  at::parallel_for(0, num_rois * channels, 8, [&](int64_t begin, int64_t end) {
    RoiWeights<T> rw;
    std::vector<T> row_buf;
    int64_t current = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t k = task / channels, c = task % channels;
      if (k != current) {
        rw.compute(rp + k * 5, spatial_scale, pooled_height, pooled_width, height, width, false);
        current = k;
      }
      const T* plane = in + (rw.batch * channels + c) * height * width;
      forward_one(rw, plane, width, pooled_height, pooled_width, row_buf, out + task * n_out);
    }
  });
}

// Adds d(sum gout * out)/d plane for one (RoI, channel); col_buf is scratch.
template <typename T>
void backward_input_one(const RoiWeights<T>& rw, const T* gout, int64_t width,
                        int64_t pooled_height, int64_t pooled_width, std::vector<T>& col_buf,
                        T* grad_plane) {
  const AxisWeights<T>& x = rw.x;
  const AxisWeights<T>& y = rw.y;
  const int64_t r0 = y.span_first, n_rows = y.span_last - y.span_first + 1;
  // G[r, pw] = sum_ph wy[ph](r) * gout[ph, pw] / area: the transpose of the forward's y pass.
  col_buf.assign(n_rows * pooled_width, T(0));
  const T inv_area = T(1) / rw.bin.area;
  for (int64_t ph = 0; ph < pooled_height; ++ph) {
    const T* g = gout + ph * pooled_width;
    const T* wy = y.weight.data() + y.offset[ph];
    for (int64_t i = 0; i < y.count[ph]; ++i) {
      T* G = col_buf.data() + (y.first[ph] + i - r0) * pooled_width;
      const T w = wy[i] * inv_area;
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
template <typename T>
void backward_rois_one(const RoiWeights<T>& rw, const T* plane, const T* gout, const T* out,
                       int64_t height, int64_t width, int64_t pooled_height, int64_t pooled_width,
                       T spatial_scale, std::vector<T>& buf, T* roi_grad) {
  const AxisWeights<T>& x = rw.x;
  const AxisWeights<T>& y = rw.y;
  // An empty RoI has zero area or lies in the zero region, where every edge integral and
  // output is 0: no gradient.
  if (rw.empty) return;
  const int64_t n = pooled_height * pooled_width;
  // Line integrals along the four edges of every bin, [PH, PW] each.
  buf.assign(4 * n, T(0));
  T* e_x_lo = buf.data();
  T* e_x_hi = e_x_lo + n;
  T* e_y_lo = e_x_hi + n;
  T* e_y_hi = e_y_lo + n;
  // Vertical edges: for each bin row ph and each touched pixel row r, interpolate the row at the
  // bin's x edges and weight by the row's interval weight.
  for (int64_t ph = 0; ph < pooled_height; ++ph) {
    const T* wy = y.weight.data() + y.offset[ph];
    for (int64_t i = 0; i < y.count[ph]; ++i) {
      const T* row = plane + (y.first[ph] + i) * width;
      const T w = wy[i];
      for (int64_t pw = 0; pw < pooled_width; ++pw) {
        T v_lo = T(0), v_hi = T(0);
        for (int64_t j = 0; j < x.lo_count[pw]; ++j)
          v_lo += x.lo_weight[2 * pw + j] * row[x.lo_first[pw] + j];
        for (int64_t j = 0; j < x.hi_count[pw]; ++j)
          v_hi += x.hi_weight[2 * pw + j] * row[x.hi_first[pw] + j];
        e_x_lo[ph * pooled_width + pw] += w * v_lo;
        e_x_hi[ph * pooled_width + pw] += w * v_hi;
      }
    }
  }
  // Horizontal edges: interpolate the (at most two) rows around each bin's y edge, then weight
  // the pixels by the bin columns' interval weights.
  for (int64_t ph = 0; ph < pooled_height; ++ph) {
    for (int64_t side = 0; side < 2; ++side) {
      const int64_t f = side == 0 ? y.lo_first[ph] : y.hi_first[ph];
      const int64_t cnt = side == 0 ? y.lo_count[ph] : y.hi_count[ph];
      const T* wv = (side == 0 ? y.lo_weight.data() : y.hi_weight.data()) + 2 * ph;
      T* e = (side == 0 ? e_y_lo : e_y_hi) + ph * pooled_width;
      for (int64_t i = 0; i < cnt; ++i) {
        const T* row = plane + (f + i) * width;
        for (int64_t pw = 0; pw < pooled_width; ++pw) {
          const T* wx = x.weight.data() + x.offset[pw];
          const T* px = row + x.first[pw];
          T s = T(0);
          for (int64_t j = 0; j < x.count[pw]; ++j) s += wx[j] * px[j];
          e[pw] += wv[i] * s;
        }
      }
    }
  }
  for (int64_t ph = 0; ph < pooled_height; ++ph) {
    for (int64_t pw = 0; pw < pooled_width; ++pw) {
      const int64_t o = ph * pooled_width + pw;
      accumulate_roi_grad(gout[o], out[o], rw.bin, e_x_lo[o], e_x_hi[o], e_y_lo[o], e_y_hi[o], ph,
                          pw, pooled_height, pooled_width, spatial_scale, roi_grad);
    }
  }
}

template <typename T>
void backward_impl(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& rois,
                   const at::Tensor& output, T spatial_scale, int64_t pooled_height,
                   int64_t pooled_width, at::Tensor* grad_input, at::Tensor* roi_partials) {
  const int64_t num_images = input.size(0), channels = input.size(1);
  const int64_t height = input.size(2), width = input.size(3);
  const int64_t num_rois = rois.size(0);
  const int64_t n_out = pooled_height * pooled_width;
  const bool rois_grad = roi_partials != nullptr;
  const T* rp = rois.data_ptr<T>();

  // Channel-independent weights of every RoI, computed once (parallel over RoIs).
  std::vector<RoiWeights<T>> weights(num_rois);
  at::parallel_for(0, num_rois, 16, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k)
      weights[k].compute(rp + k * 5, spatial_scale, pooled_height, pooled_width, height, width,
                         rois_grad);
  });
  std::vector<std::vector<int64_t>> rois_of_image(num_images);
  for (int64_t k = 0; k < num_rois; ++k) rois_of_image[weights[k].batch].push_back(k);

  const T* in = input.data_ptr<T>();
  const T* gout = grad_output.data_ptr<T>();
  const T* out = output.data_ptr<T>();
  T* gin = grad_input ? grad_input->data_ptr<T>() : nullptr;
  T* partial = rois_grad ? roi_partials->data_ptr<T>() : nullptr;

  at::parallel_for(0, num_images * channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / channels, c = task % channels;
      const T* plane = in + task * height * width;
      for (int64_t k : rois_of_image[b]) {
        const RoiWeights<T>& rw = weights[k];
        const int64_t o = (k * channels + c) * n_out;
        if (gin != nullptr && !rw.empty)
          backward_input_one(rw, gout + o, width, pooled_height, pooled_width, buf,
                             gin + task * height * width);
        if (rois_grad)
          backward_rois_one(rw, plane, gout + o, out + o, height, width, pooled_height,
                            pooled_width, spatial_scale, buf, partial + (k * channels + c) * 4);
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
  const at::Tensor rois = rois_.contiguous();
  check_batch_indices(rois, input.size(0));
  at::Tensor output = at::empty({rois.size(0), input.size(1), pooled_height, pooled_width},
                                input.options());
  if (output.numel() == 0) return output;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "prroi_pool_forward_cpu", [&] {
    forward_impl<scalar_t>(input, rois, output, static_cast<scalar_t>(spatial_scale),
                           pooled_height, pooled_width);
  });
  return output;
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
  const at::Tensor rois = rois_.contiguous();
  const at::Tensor output = output_.contiguous();
  check_batch_indices(rois, input.size(0));
  const int64_t num_rois = rois.size(0), channels = input.size(1);

  at::Tensor grad_input = input_grad ? at::zeros_like(input) : at::empty({0}, input.options());
  at::Tensor grad_rois = rois_grad ? at::zeros_like(rois) : at::empty({0}, rois.options());
  at::Tensor partials;
  if (rois_grad) partials = at::zeros({num_rois, channels, 4}, rois.options());
  if ((!input_grad && !rois_grad) || grad_output.numel() == 0) return {grad_input, grad_rois};

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "prroi_pool_backward_cpu", [&] {
    backward_impl<scalar_t>(grad_output, input, rois, output, static_cast<scalar_t>(spatial_scale),
                            pooled_height, pooled_width, input_grad ? &grad_input : nullptr,
                            rois_grad ? &partials : nullptr);
  });
  // Sum over channels outside the parallel region; column 0 (batch index) stays 0.
  if (rois_grad) grad_rois.narrow(1, 1, 4).copy_(partials.sum(1));
  return {grad_input, grad_rois};
}

}  // namespace

TORCH_LIBRARY_IMPL(ioulab, CPU, m) {
  m.impl("prroi_pool", &prroi_pool_forward_cpu);
  m.impl("prroi_pool_backward", &prroi_pool_backward_cpu);
}

}  // namespace prroi
}  // namespace ioulab
