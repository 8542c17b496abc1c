// CPU kernels for the filtered conv's memory-bound steps: block sums and
// means, the broadcast of grid gradients back to pixels, the sum over a
// kernel's taps (both axes, or one) and its inverse. Each is one pass over
// the full-size tensor, parallel over channel planes (or filters), with inner
// loops the compiler vectorizes: block widths are compile-time constants for
// the usual sizes, so runs of b1 pixels become interleaved vector loads and
// stores rather than short loops. Registered as torch.ops.mmgradfilt.*; the
// pure-PyTorch reference in reference.py gives the same results.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kGrainElements = 1 << 15;

template <int64_t N>
using Run = std::integral_constant<int64_t, N>;

// Calls f with the block width as a compile-time constant where it is a
// usual one (r * stride for r in 2, 4, 7, 8), else with Run<0> (runtime).
template <typename F>
void with_run(int64_t b1, F&& f) {
  switch (b1) {
    case 1: return f(Run<1>());
    case 2: return f(Run<2>());
    case 3: return f(Run<3>());
    case 4: return f(Run<4>());
    case 6: return f(Run<6>());
    case 7: return f(Run<7>());
    case 8: return f(Run<8>());
    case 14: return f(Run<14>());
    case 16: return f(Run<16>());
    default: return f(Run<0>());
  }
}

int64_t cells(int64_t size, int64_t block) { return (size + block - 1) / block; }

// Grain of a parallel loop over items of `size` elements; empty items (an
// empty map) must not divide by zero.
int64_t grain(int64_t size) {
  return 1 + kGrainElements / std::max<int64_t>(size, 1);
}

// Sums (or means) of x over b0 x b1 tiles, partial last tiles included: each
// block row is summed into a row buffer, then its b1-pixel runs are summed.
// Square blocks also take b0 as a constant (R0), so that the rows of a block
// are added in registers, one pass.
template <typename scalar_t, typename out_t, typename R0, typename R>
void block_reduce_impl(const at::Tensor& x, at::Tensor& out,
                       int64_t b0_runtime, int64_t b1_runtime, bool mean, R0,
                       R) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t B0 = R0::value;
  const int64_t b0 = B0 ? B0 : b0_runtime;
  const int64_t b1 = R::value ? R::value : b1_runtime;
  const int64_t H = x.size(2), W = x.size(3);
  const int64_t HB = out.size(2), WB = out.size(3), full = W / b1;
  const scalar_t* src = x.data_ptr<scalar_t>();
  out_t* dst = out.data_ptr<out_t>();
  at::parallel_for(0, x.size(0) * x.size(1), grain(H * W),
                   [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer(W);
    acc_t* row = buffer.data();
    for (int64_t plane = begin; plane < end; ++plane) {
      const scalar_t* in = src + plane * H * W;
      out_t* o = dst + plane * HB * WB;
      for (int64_t h0 = 0; h0 < H; h0 += b0, o += WB) {
        const int64_t rows = std::min(b0, H - h0);
        if (B0 && rows == B0) {
          for (int64_t w = 0; w < W; ++w) {
            acc_t s = static_cast<acc_t>(in[w]);
            for (int64_t h = 1; h < B0; ++h)
              s += static_cast<acc_t>(in[h * W + w]);
            row[w] = s;
          }
          in += B0 * W;
        } else {
          for (int64_t w = 0; w < W; ++w) row[w] = static_cast<acc_t>(in[w]);
          in += W;
          for (int64_t h = 1; h < rows; ++h, in += W)
            for (int64_t w = 0; w < W; ++w) row[w] += static_cast<acc_t>(in[w]);
        }
        const acc_t scale = mean ? acc_t(1) / static_cast<acc_t>(rows * b1)
                                 : acc_t(1);
        for (int64_t j = 0; j < full; ++j) {
          acc_t s = 0;
          for (int64_t k = 0; k < b1; ++k) s += row[j * b1 + k];
          o[j] = static_cast<out_t>(s * scale);
        }
        if (full < WB) {  // partial last block
          acc_t s = 0;
          for (int64_t w = full * b1; w < W; ++w) s += row[w];
          o[full] = static_cast<out_t>(
              mean ? s / static_cast<acc_t>(rows * (W - full * b1)) : s);
        }
      }
    }
  });
}

// Every pixel gets its grid cell divided by the cell's pixel count; pixels of
// blocks beyond the grid get zero, grid cells beyond the blocks are unused.
// Each block row is widened once into its first pixel row, which is then
// copied to the block's other rows.
template <typename grid_t, typename out_t, typename R>
void broadcast_impl(const at::Tensor& grid, at::Tensor& out, int64_t b0,
                    int64_t b1_runtime, R) {
  const int64_t b1 = R::value ? R::value : b1_runtime;
  const int64_t HG = grid.size(2), WG = grid.size(3);
  const int64_t H = out.size(2), W = out.size(3);
  const int64_t WB = cells(W, b1), full = std::min(W / b1, WG);
  const grid_t* src = grid.data_ptr<grid_t>();
  out_t* dst = out.data_ptr<out_t>();
  at::parallel_for(0, out.size(0) * out.size(1), grain(H * W),
                   [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      out_t* o = dst + plane * H * W;
      for (int64_t i = 0, h0 = 0; h0 < H; ++i, h0 += b0) {
        const int64_t rows = std::min(b0, H - h0);
        out_t* first = o + h0 * W;
        if (i >= HG) {
          std::fill(first, first + rows * W, out_t(0));
          continue;
        }
        const grid_t* g = src + (plane * HG + i) * WG;
        const grid_t scale = grid_t(1) / static_cast<grid_t>(rows * b1);
        for (int64_t j = 0; j < full; ++j) {
          const out_t v = static_cast<out_t>(g[j] * scale);
          for (int64_t k = 0; k < b1; ++k) first[j * b1 + k] = v;
        }
        for (int64_t j = full; j < WB; ++j) {  // partial or missing blocks
          const int64_t w0 = j * b1, w1 = std::min(w0 + b1, W);
          const out_t v = static_cast<out_t>(
              j < WG ? g[j] / static_cast<grid_t>(rows * (w1 - w0)) : 0);
          std::fill(first + w0, first + w1, v);
        }
        for (int64_t h = 1; h < rows; ++h)
          std::memcpy(first + h * W, first, W * sizeof(out_t));
      }
    }
  });
}

// Sum over the taps of each filter, (M, T) -> (M); or the inverse layout,
// every tap of a filter set to the filter's value.
template <typename scalar_t, typename R>
void taps_impl(const scalar_t* src, scalar_t* dst, int64_t filters,
               int64_t taps_runtime, bool sum, R) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t taps = R::value ? R::value : taps_runtime;
  at::parallel_for(0, filters, grain(taps), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      if (sum) {
        acc_t s = 0;
        for (int64_t t = 0; t < taps; ++t) s += src[m * taps + t];
        dst[m] = static_cast<scalar_t>(s);
      } else {
        for (int64_t t = 0; t < taps; ++t) dst[m * taps + t] = src[m];
      }
    }
  });
}

// The same along one axis only (a dilated axis keeps its taps on the grid):
// `full` is (M, kh, kw), `small` (M, sh, sw) with sh in {1, kh}, sw in {1, kw};
// sum: small = full summed over the axes where small has one tap, else every
// tap of full gets its value in small. Kernels are small: plain loops.
template <typename scalar_t>
void axis_taps_impl(scalar_t* full, scalar_t* small, int64_t filters,
                    int64_t kh, int64_t kw, int64_t sh, int64_t sw, bool sum) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, filters, grain(kh * kw), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      scalar_t* f = full + m * kh * kw;
      scalar_t* s = small + m * sh * sw;
      if (sum) {
        for (int64_t i = 0; i < sh; ++i)
          for (int64_t j = 0; j < sw; ++j) {
            acc_t acc = 0;
            for (int64_t y = sh == 1 ? 0 : i; y < (sh == 1 ? kh : i + 1); ++y)
              for (int64_t x = sw == 1 ? 0 : j; x < (sw == 1 ? kw : j + 1); ++x)
                acc += f[y * kw + x];
            s[i * sw + j] = static_cast<scalar_t>(acc);
          }
      } else {
        for (int64_t y = 0; y < kh; ++y)
          for (int64_t x = 0; x < kw; ++x)
            f[y * kw + x] = s[(sh == 1 ? 0 : y) * sw + (sw == 1 ? 0 : x)];
      }
    }
  });
}

// Compile-time tap counts of the usual kernels (1x1 needs no kernel).
template <typename F>
void with_taps(int64_t taps, F&& f) {
  switch (taps) {
    case 9: return f(Run<9>());
    case 25: return f(Run<25>());
    case 49: return f(Run<49>());
    default: return f(Run<0>());
  }
}

void check_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 4 && t.is_contiguous(), name,
              " must be a contiguous 4-D CPU tensor");
}

at::Tensor block_reduce(const at::Tensor& x, int64_t b0, int64_t b1, bool mean,
                        at::ScalarType dtype) {
  check_input(x, "x");
  TORCH_CHECK(b0 > 0 && b1 > 0, "block sizes must be positive");
  auto out = at::empty({x.size(0), x.size(1), cells(x.size(2), b0),
                        cells(x.size(3), b1)},
                       x.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "block_reduce", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        TORCH_CHECK(dtype == x.scalar_type() ||
                        dtype == c10::CppTypeToScalarType<acc_t>::value,
                    "block_reduce returns the input's or its accumulation "
                    "dtype");
        with_run(b1, [&](auto run) {
          auto reduce = [&](auto run0) {
            if (dtype == x.scalar_type())
              block_reduce_impl<scalar_t, scalar_t>(x, out, b0, b1, mean, run0,
                                                    run);
            else
              block_reduce_impl<scalar_t, acc_t>(x, out, b0, b1, mean, run0,
                                                 run);
          };
          if (b0 == b1)
            reduce(run);
          else
            reduce(Run<0>());
        });
      });
  return out;
}

at::Tensor broadcast_blocks(const at::Tensor& grid, int64_t b0, int64_t b1,
                            int64_t height, int64_t width,
                            at::ScalarType dtype) {
  check_input(grid, "grid");
  TORCH_CHECK(b0 > 0 && b1 > 0, "block sizes must be positive");
  auto out = at::empty({grid.size(0), grid.size(1), height, width},
                       grid.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(grid.scalar_type(), "broadcast_blocks", [&] {
    using grid_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, dtype, "broadcast_blocks_out", [&] {
          with_run(b1, [&](auto run) {
            broadcast_impl<grid_t, scalar_t>(grid, out, b0, b1, run);
          });
        });
  });
  return out;
}

// weight summed over its taps along the axes asked (keepdim), the full sum
// (the usual case) at compile-time tap counts.
at::Tensor sum_taps(const at::Tensor& weight, bool sum_h, bool sum_w) {
  check_input(weight, "weight");
  const int64_t kh = weight.size(2), kw = weight.size(3);
  const int64_t sh = sum_h ? 1 : kh, sw = sum_w ? 1 : kw;
  auto out = at::empty({weight.size(0), weight.size(1), sh, sw},
                       weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight.scalar_type(), "sum_taps", [&] {
        scalar_t* src = weight.data_ptr<scalar_t>();
        scalar_t* dst = out.data_ptr<scalar_t>();
        const int64_t filters = weight.size(0) * weight.size(1);
        if (sh == 1 && sw == 1)
          with_taps(kh * kw, [&](auto run) {
            taps_impl<scalar_t>(src, dst, filters, kh * kw, true, run);
          });
        else
          axis_taps_impl<scalar_t>(src, dst, filters, kh, kw, sh, sw, true);
      });
  return out;
}

// The inverse: grad, summed over some tap axes (size 1 there), copied to
// every tap of `shape` (a broadcast).
at::Tensor repeat_taps(const at::Tensor& grad, at::IntArrayRef shape) {
  check_input(grad, "grad");
  TORCH_CHECK(shape.size() == 4 && grad.size(0) == shape[0] &&
                  grad.size(1) == shape[1] &&
                  (grad.size(2) == 1 || grad.size(2) == shape[2]) &&
                  (grad.size(3) == 1 || grad.size(3) == shape[3]),
              "grad ", grad.sizes(), " does not broadcast to ", shape,
              " over the kernel's taps");
  auto out = at::empty(shape, grad.options());
  const int64_t kh = shape[2], kw = shape[3];
  const int64_t sh = grad.size(2), sw = grad.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "repeat_taps", [&] {
        scalar_t* src = grad.data_ptr<scalar_t>();
        scalar_t* dst = out.data_ptr<scalar_t>();
        const int64_t filters = shape[0] * shape[1];
        if (sh == 1 && sw == 1)
          with_taps(kh * kw, [&](auto run) {
            taps_impl<scalar_t>(src, dst, filters, kh * kw, false, run);
          });
        else
          axis_taps_impl<scalar_t>(dst, src, filters, kh, kw, sh, sw, false);
      });
  return out;
}

}  // namespace

TORCH_LIBRARY(mmgradfilt, m) {
  m.def("block_reduce(Tensor x, int b0, int b1, bool mean, ScalarType dtype) -> Tensor");
  m.def("broadcast_blocks(Tensor grid, int b0, int b1, int height, int width, ScalarType dtype) -> Tensor");
  m.def("sum_taps(Tensor weight, bool sum_h, bool sum_w) -> Tensor");
  m.def("repeat_taps(Tensor grad, int[] shape) -> Tensor");
}

TORCH_LIBRARY_IMPL(mmgradfilt, CPU, m) {
  m.impl("block_reduce", &block_reduce);
  m.impl("broadcast_blocks", &broadcast_blocks);
  m.impl("sum_taps", &sum_taps);
  m.impl("repeat_taps", &repeat_taps);
}
