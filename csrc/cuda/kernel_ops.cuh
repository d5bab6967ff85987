// kernel_ops.cuh: what one CUDA thread does in the fused ops, as host-device code without torch headers.
//
// csrc/cuda/kernels.cu wraps these pieces in __global__ kernels; tests/cuda_emu/emulator.cpp runs the very same
// pieces on the host (a sequential "block"), so that the indexing, the vectorized and scalar paths, the Philox
// grouping and the reduction layout are tested against the CPU kernels on a machine without a GPU.
//
// Work decomposition (shared by every op):
// - every tensor is B rows of `inner` dense elements (kernel_args.h); a row is cut into items of kVec consecutive
//   elements (16 bytes: 4 floats, 8 halves / bfloat16s; 4 doubles = 32 bytes), item i covering [i kVec, (i+1) kVec);
// - a tile is `threads * kItemsPerThread` consecutive items of ONE sample, handled by one block: thread k takes
//   items first + k, first + k + threads, ... (coalesced), so the per-sample coefficients are uniform in a block.
//   One thread computes them (from the float64 table, in double: the expensive part) into shared memory while
//   every thread's first loads are already in flight (tile_prefetch), then all threads read them (tile_process);
// - the vectorized path (one 16-byte access per pack) is taken when every pointer is 16-byte aligned, every
//   row stride is a multiple of 16 bytes and inner is a multiple of kVec; otherwise the scalar path does the same
//   items element by element with bounds checks;
// - in-kernel noise: item (b, j0) draws philox_normal4 for groups j0/4 ... j0/4 + kVec/4 - 1 of image
//   first_row + b, element j taking lane j % 4 of group j / 4, exactly like the CPU kernels, so one seed gives the
//   same noise on both;
// - timesteps are clamped into [0, T) (t_prev into (-inf, T)) before indexing the table: the Python wrapper
//   validates their values, and a kernel never reads out of bounds whatever it is given.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#include <type_traits>

#include "diffcore_math.h"
#include "dispatch.h"
#include "kernel_args.h"

namespace diffcore {
namespace cuda {

constexpr int kMaxThreads = 256;     // threads per block (a multiple of 32)
constexpr int kItemsPerThread = 4;   // items per thread and tile

// ---- scalar types: storage type scalar_t, compute type acc_t = acc_type<scalar_t> (dispatch.h) ----

struct CudaTypes {
  using half = __half;
  using bfloat16 = __nv_bfloat16;
};

template <typename acc_t> DC_HD acc_t to_acc(float v) { return (acc_t)v; }
template <typename acc_t> DC_HD acc_t to_acc(double v) { return (acc_t)v; }
template <typename acc_t> DC_HD acc_t to_acc(__half v) { return (acc_t)__half2float(v); }
template <typename acc_t> DC_HD acc_t to_acc(__nv_bfloat16 v) { return (acc_t)__bfloat162float(v); }

// Round to nearest even, like c10::Half / c10::BFloat16 from float on the CPU. Only explicit intrinsics: torch
// builds CUDA code with __CUDA_NO_HALF_CONVERSIONS__ and __CUDA_NO_BFLOAT16_CONVERSIONS__.
template <typename scalar_t, typename acc_t>
DC_HD scalar_t from_acc(acc_t v) {
  if constexpr (std::is_same<scalar_t, __half>::value) {
    return __float2half_rn((float)v);
  } else if constexpr (std::is_same<scalar_t, __nv_bfloat16>::value) {
    return __float2bfloat16_rn((float)v);
  } else {
    return (scalar_t)v;
  }
}

// Elements per item: 16 bytes of 2- or 4-byte types; 4 doubles (32 bytes) keep Philox groups whole.
template <typename scalar_t>
constexpr int kVecOf = sizeof(scalar_t) == 2 ? 8 : 4;

// kVec elements of one item; 16-byte aligned (a double pack is two 16-byte accesses).
template <typename scalar_t>
struct alignas(16) Pack {
  scalar_t v[kVecOf<scalar_t>];
};

// Elements [j0, j0 + kVec) of a row; in the scalar path the ones at or past `inner` read as 0.
template <bool VEC, typename scalar_t>
DC_HD void load_pack(const scalar_t* row, int64_t j0, int64_t inner, Pack<scalar_t>& p) {
  if constexpr (VEC) {
    p = *reinterpret_cast<const Pack<scalar_t>*>(row + j0);
  } else {
    DC_UNROLL
    for (int k = 0; k < kVecOf<scalar_t>; ++k) {
      p.v[k] = j0 + k < inner ? row[j0 + k] : from_acc<scalar_t>(0.0f);
    }
  }
}

template <bool VEC, typename scalar_t>
DC_HD void store_pack(scalar_t* row, int64_t j0, int64_t inner, const Pack<scalar_t>& p) {
  if constexpr (VEC) {
    *reinterpret_cast<Pack<scalar_t>*>(row + j0) = p;
  } else {
    DC_UNROLL
    for (int k = 0; k < kVecOf<scalar_t>; ++k) {
      if (j0 + k < inner) row[j0 + k] = p.v[k];
    }
  }
}

// True when every row of r starts on a 16-byte boundary.
template <typename scalar_t>
inline bool rows_aligned(const void* data, int64_t batch_stride) {
  return (reinterpret_cast<uintptr_t>(data) % 16) == 0 && (batch_stride * (int64_t)sizeof(scalar_t)) % 16 == 0;
}
template <typename scalar_t>
inline bool rows_aligned(const Rows& r) {
  return rows_aligned<scalar_t>(r.data, r.batch_stride);
}
template <typename scalar_t>
inline bool rows_aligned(const OutRows& r) {
  return rows_aligned<scalar_t>(r.data, r.batch_stride);
}

DC_HD int64_t clamp_t(int64_t t, int64_t num_timesteps) {
  return t < 0 ? 0 : (t >= num_timesteps ? num_timesteps - 1 : t);
}

// t_prev: negative values all mean "the final step" and stay negative.
DC_HD int64_t clamp_t_prev(int64_t t_prev, int64_t num_timesteps) {
  return t_prev >= num_timesteps ? num_timesteps - 1 : t_prev;
}

// Noise of item (b, j0) in the compute type: 0 when the sample takes none, the given tensor, or Philox normals.
template <bool VEC, typename scalar_t, typename acc_t>
DC_HD void noise_values(const Noise& n, bool noisy, int64_t b, int64_t j0, int64_t inner,
                         const Pack<scalar_t>& given, acc_t (&z)[kVecOf<scalar_t>]) {
  constexpr int kVec = kVecOf<scalar_t>;
  if (!noisy) {
    DC_UNROLL
    for (int k = 0; k < kVec; ++k) z[k] = (acc_t)0;
  } else if (n.given.data != nullptr) {
    DC_UNROLL
    for (int k = 0; k < kVec; ++k) z[k] = to_acc<acc_t>(given.v[k]);
  } else {
    DC_UNROLL
    for (int g = 0; g < kVec / 4; ++g) {
      if (VEC || j0 + 4 * g < inner) {
        const Normal4<acc_t> r =
            philox_normal4<acc_t>(n.seed, n.offset, n.first_row, b, (uint64_t)((j0 >> 2) + g));
        DC_UNROLL
        for (int lane = 0; lane < 4; ++lane) z[4 * g + lane] = r.v[lane];
      } else {
        DC_UNROLL
        for (int lane = 0; lane < 4; ++lane) z[4 * g + lane] = (acc_t)0;
      }
    }
  }
}

struct NoSums {};

// Per-thread partial sums of the hybrid loss forward (double, like the CPU kernel).
struct LossSums {
  double sq, vb;
};

// ---- the ops. Each provides Coeffs (per sample), Input (one item's loads), Sums, coeffs(b), load<VEC>,
// apply<VEC> (compute and store, or accumulate), vectorizable() and batch()/inner(). ----

template <typename scalar_t>
struct QSampleOp {
  using acc_t = acc_type<scalar_t>;
  static constexpr int kVec = kVecOf<scalar_t>;
  using Coeffs = PredictCoeffs<acc_t>;
  using Sums = NoSums;
  struct Input {
    Pack<scalar_t> x0, noise;
  };

  QSampleArgs a;

  int64_t batch() const { return a.batch; }
  int64_t inner() const { return a.inner; }
  bool vectorizable() const {
    return a.inner % kVec == 0 && rows_aligned<scalar_t>(a.x0) && rows_aligned<scalar_t>(a.noise) &&
           rows_aligned<scalar_t>(a.out);
  }
  DC_HD Coeffs coeffs(int64_t b) const {
    return make_predict_coeffs<acc_t>(a.alphas_cumprod[clamp_t(a.t[b], a.num_timesteps)]);
  }
  template <bool VEC>
  DC_HD void load(int64_t b, int64_t j0, Input& in) const {
    load_pack<VEC>(row<scalar_t>(a.x0, b), j0, a.inner, in.x0);
    load_pack<VEC>(row<scalar_t>(a.noise, b), j0, a.inner, in.noise);
  }
  template <bool VEC>
  DC_HD void apply(const Coeffs& c, int64_t b, int64_t j0, const Input& in, Sums&) const {
    Pack<scalar_t> out;
    DC_UNROLL
    for (int k = 0; k < kVec; ++k) {
      out.v[k] = from_acc<scalar_t>(q_sample_value(c, to_acc<acc_t>(in.x0.v[k]), to_acc<acc_t>(in.noise.v[k])));
    }
    store_pack<VEC>(row<scalar_t>(a.out, b), j0, a.inner, out);
  }
};

template <typename scalar_t, int P, bool CLIP>
struct DdimOp {
  using acc_t = acc_type<scalar_t>;
  static constexpr int kVec = kVecOf<scalar_t>;
  using Coeffs = DdimCoeffs<acc_t>;
  using Sums = NoSums;
  struct Input {
    Pack<scalar_t> x, pred, noise;
  };

  DdimStepArgs a;
  bool read_noise;  // noise tensor given and eta != 0 (else no sample takes noise)

  int64_t batch() const { return a.batch; }
  int64_t inner() const { return a.inner; }
  bool vectorizable() const {
    return a.inner % kVec == 0 && rows_aligned<scalar_t>(a.x) && rows_aligned<scalar_t>(a.model_output) &&
           (!read_noise || rows_aligned<scalar_t>(a.noise.given)) && rows_aligned<scalar_t>(a.x_prev) &&
           rows_aligned<scalar_t>(a.pred_x0);
  }
  DC_HD Coeffs coeffs(int64_t b) const {
    return make_ddim_coeffs<acc_t>(a.alphas_cumprod, clamp_t(a.t[b], a.num_timesteps),
                                   clamp_t_prev(a.t_prev[b], a.num_timesteps), a.eta);
  }
  template <bool VEC>
  DC_HD void load(int64_t b, int64_t j0, Input& in) const {
    load_pack<VEC>(row<scalar_t>(a.x, b), j0, a.inner, in.x);
    load_pack<VEC>(row<scalar_t>(a.model_output, b), j0, a.inner, in.pred);
    if (read_noise) load_pack<VEC>(row<scalar_t>(a.noise.given, b), j0, a.inner, in.noise);
  }
  template <bool VEC>
  DC_HD void apply(const Coeffs& c, int64_t b, int64_t j0, const Input& in, Sums&) const {
    acc_t z[kVec];
    noise_values<VEC>(a.noise, ddim_takes_noise(a.noise.given.data != nullptr, a.eta, c.sigma), b, j0, a.inner,
                      in.noise, z);
    Pack<scalar_t> out, out_x0;
    DC_UNROLL
    for (int k = 0; k < kVec; ++k) {
      acc_t x0;
      const acc_t value =
          ddim_value<acc_t>(P, CLIP, c, to_acc<acc_t>(in.x.v[k]), to_acc<acc_t>(in.pred.v[k]), z[k], x0);
      out.v[k] = from_acc<scalar_t>(value);
      out_x0.v[k] = from_acc<scalar_t>(x0);
    }
    store_pack<VEC>(row<scalar_t>(a.x_prev, b), j0, a.inner, out);
    store_pack<VEC>(row<scalar_t>(a.pred_x0, b), j0, a.inner, out_x0);
  }
};

// VT is kFixedSmall for both fixed types (the element code is the same; make_posterior_coeffs gets the real
// variance_type at run time), kLearnedRange or kLearned.
template <typename scalar_t, int P, int VT, bool CLIP>
struct DdpmOp {
  using acc_t = acc_type<scalar_t>;
  static constexpr int kVec = kVecOf<scalar_t>;
  static constexpr bool kLearnedVar = VT == kLearnedRange || VT == kLearned;
  using Coeffs = PosteriorCoeffs<acc_t>;
  using Sums = NoSums;
  struct Input {
    Pack<scalar_t> x, pred, var, noise;
  };

  DdpmStepArgs a;

  int64_t batch() const { return a.batch; }
  int64_t inner() const { return a.inner; }
  bool vectorizable() const {
    return a.inner % kVec == 0 && rows_aligned<scalar_t>(a.x) && rows_aligned<scalar_t>(a.prediction) &&
           (!kLearnedVar || rows_aligned<scalar_t>(a.variance)) &&
           (a.noise.given.data == nullptr || rows_aligned<scalar_t>(a.noise.given)) &&
           rows_aligned<scalar_t>(a.x_prev) && rows_aligned<scalar_t>(a.pred_x0);
  }
  DC_HD Coeffs coeffs(int64_t b) const {
    return make_posterior_coeffs<acc_t>(a.alphas_cumprod, clamp_t(a.t[b], a.num_timesteps), a.variance_type);
  }
  template <bool VEC>
  DC_HD void load(int64_t b, int64_t j0, Input& in) const {
    load_pack<VEC>(row<scalar_t>(a.x, b), j0, a.inner, in.x);
    load_pack<VEC>(row<scalar_t>(a.prediction, b), j0, a.inner, in.pred);
    if constexpr (kLearnedVar) load_pack<VEC>(row<scalar_t>(a.variance, b), j0, a.inner, in.var);
    if (a.noise.given.data != nullptr) load_pack<VEC>(row<scalar_t>(a.noise.given, b), j0, a.inner, in.noise);
  }
  template <bool VEC>
  DC_HD void apply(const Coeffs& c, int64_t b, int64_t j0, const Input& in, Sums&) const {
    acc_t z[kVec];
    noise_values<VEC>(a.noise, ddpm_takes_noise(a.noise.given.data != nullptr, c.nonzero_t), b, j0, a.inner,
                      in.noise, z);
    Pack<scalar_t> out, out_x0;
    DC_UNROLL
    for (int k = 0; k < kVec; ++k) {
      const acc_t v = kLearnedVar ? to_acc<acc_t>(in.var.v[k]) : (acc_t)0;
      acc_t x0;
      const acc_t value = ddpm_value<acc_t>(P, VT, CLIP, c, to_acc<acc_t>(in.x.v[k]), to_acc<acc_t>(in.pred.v[k]),
                                            v, z[k], x0);
      out.v[k] = from_acc<scalar_t>(value);
      out_x0.v[k] = from_acc<scalar_t>(x0);
    }
    store_pack<VEC>(row<scalar_t>(a.x_prev, b), j0, a.inner, out);
    store_pack<VEC>(row<scalar_t>(a.pred_x0, b), j0, a.inner, out_x0);
  }
};

// The hybrid loss: GRAD = false accumulates the per-sample sums (forward), GRAD = true writes the gradients with
// respect to the prediction and variance outputs (backward, elementwise).
template <typename scalar_t, int P, int VT, bool GRAD>
struct HybridOp {
  using acc_t = acc_type<scalar_t>;
  static constexpr int kVec = kVecOf<scalar_t>;
  struct Coeffs {
    PosteriorCoeffs<acc_t> post;
    acc_t g_mse, g_vb;  // backward: grad_mse[b] / inner and grad_vb[b] / inner
  };
  using Sums = LossSums;
  struct Input {
    Pack<scalar_t> pred, var, x0, x_t, noise;
  };

  HybridLossArgs a;

  int64_t batch() const { return a.batch; }
  int64_t inner() const { return a.inner; }
  bool vectorizable() const {
    const bool inputs = a.inner % kVec == 0 && rows_aligned<scalar_t>(a.prediction) &&
                        rows_aligned<scalar_t>(a.variance) && rows_aligned<scalar_t>(a.x0) &&
                        rows_aligned<scalar_t>(a.x_t) && rows_aligned<scalar_t>(a.noise);
    return inputs && (!GRAD || (rows_aligned<scalar_t>(a.grad_prediction) && rows_aligned<scalar_t>(a.grad_variance)));
  }
  DC_HD Coeffs coeffs(int64_t b) const {
    Coeffs c;
    c.post = make_posterior_coeffs<acc_t>(a.alphas_cumprod, clamp_t(a.t[b], a.num_timesteps), VT);
    if constexpr (GRAD) {
      const acc_t inv_n = (acc_t)(1.0 / (double)a.inner);
      c.g_mse = static_cast<const acc_t*>(a.grad_mse)[b] * inv_n;
      c.g_vb = static_cast<const acc_t*>(a.grad_vb)[b] * inv_n;
    } else {
      c.g_mse = c.g_vb = (acc_t)0;
    }
    return c;
  }
  template <bool VEC>
  DC_HD void load(int64_t b, int64_t j0, Input& in) const {
    load_pack<VEC>(row<scalar_t>(a.prediction, b), j0, a.inner, in.pred);
    load_pack<VEC>(row<scalar_t>(a.variance, b), j0, a.inner, in.var);
    load_pack<VEC>(row<scalar_t>(a.x0, b), j0, a.inner, in.x0);
    load_pack<VEC>(row<scalar_t>(a.x_t, b), j0, a.inner, in.x_t);
    load_pack<VEC>(row<scalar_t>(a.noise, b), j0, a.inner, in.noise);
  }
  template <bool VEC>
  DC_HD void apply(const Coeffs& c, int64_t b, int64_t j0, const Input& in, Sums& sums) const {
    Pack<scalar_t> grad_pred, grad_var;
    DC_UNROLL
    for (int k = 0; k < kVec; ++k) {
      const HybridTerms<acc_t> terms = hybrid_terms<acc_t>(
          P, VT, c.post, to_acc<acc_t>(in.pred.v[k]), to_acc<acc_t>(in.var.v[k]), to_acc<acc_t>(in.x0.v[k]),
          to_acc<acc_t>(in.x_t.v[k]), to_acc<acc_t>(in.noise.v[k]), GRAD);
      if constexpr (GRAD) {
        grad_pred.v[k] = from_acc<scalar_t>(c.g_mse * terms.d_sq_err_d_pred);
        grad_var.v[k] = from_acc<scalar_t>(c.g_vb * terms.d_vb_d_v);
      } else if (VEC || j0 + k < a.inner) {  // padding elements of the scalar path do not count
        sums.sq += (double)terms.sq_err;
        sums.vb += (double)terms.vb_bits;
      }
    }
    if constexpr (GRAD) {
      store_pack<VEC>(row<scalar_t>(a.grad_prediction, b), j0, a.inner, grad_pred);
      store_pack<VEC>(row<scalar_t>(a.grad_variance, b), j0, a.inner, grad_var);
    }
  }
};

// ---- tiles ----

struct TileShape {
  int64_t batch, inner;
  int64_t items_per_row;  // ceil(inner / kVec)
  int64_t tile_items;     // threads * kItemsPerThread
  int64_t tiles_per_row;  // ceil(items_per_row / tile_items)
  int64_t num_tiles;      // batch * tiles_per_row
  int threads;            // block size: a multiple of 32 in [32, kMaxThreads]
};

// Depends only on (batch, inner, kVec), so the hybrid loss workspace size can be computed before the launch.
inline TileShape make_tile_shape(int64_t batch, int64_t inner, int vec) {
  TileShape s;
  s.batch = batch;
  s.inner = inner;
  s.items_per_row = (inner + vec - 1) / vec;
  const int64_t wanted = (s.items_per_row + kItemsPerThread - 1) / kItemsPerThread;  // threads for one tile a row
  const int64_t rounded = (wanted + 31) / 32 * 32;
  s.threads = (int)(rounded < 32 ? 32 : (rounded > kMaxThreads ? kMaxThreads : rounded));
  s.tile_items = (int64_t)s.threads * kItemsPerThread;
  s.tiles_per_row = (s.items_per_row + s.tile_items - 1) / s.tile_items;
  s.num_tiles = batch * s.tiles_per_row;
  return s;
}

template <typename Op>
TileShape tile_shape_of(const Op& op) {
  return make_tile_shape(op.batch(), op.inner(), Op::kVec);
}

DC_HD int64_t tile_sample(const TileShape& s, int64_t tile) { return tile / s.tiles_per_row; }

DC_HD int64_t tile_first_item(const TileShape& s, int64_t tile) {
  return (tile - tile_sample(s, tile) * s.tiles_per_row) * s.tile_items;
}

// Issues this thread's first loads of the tile (before the block waits for the coefficients).
template <bool VEC, typename Op>
DC_HD void tile_prefetch(const Op& op, const TileShape& s, int64_t tile, int thread, typename Op::Input& first) {
  const int64_t item = tile_first_item(s, tile) + thread;
  if (item < s.items_per_row) op.template load<VEC>(tile_sample(s, tile), item * Op::kVec, first);
}

// Processes this thread's items of the tile, loading item k + 1 before computing item k.
template <bool VEC, typename Op>
DC_HD void tile_process(const Op& op, const TileShape& s, int64_t tile, int thread,
                         const typename Op::Coeffs& shared_coeffs, const typename Op::Input& first,
                         typename Op::Sums& sums) {
  const int64_t b = tile_sample(s, tile);
  int64_t item = tile_first_item(s, tile) + thread;
  if (item >= s.items_per_row) return;
  const typename Op::Coeffs c = shared_coeffs;
  typename Op::Input cur = first;
  for (int k = 0; k < kItemsPerThread; ++k) {
    const int64_t next_item = item + s.threads;
    const bool has_next = k + 1 < kItemsPerThread && next_item < s.items_per_row;
    typename Op::Input next;
    if (has_next) op.template load<VEC>(b, next_item * Op::kVec, next);
    op.template apply<VEC>(c, b, item * Op::kVec, cur, sums);
    if (!has_next) break;
    cur = next;
    item = next_item;
  }
}

// Bytes of the hybrid loss forward workspace: per-(sample, tile) partial sums when a row spans several tiles.
inline size_t hybrid_workspace_bytes(const TileShape& s) {
  return s.tiles_per_row > 1 ? (size_t)s.num_tiles * 2 * sizeof(double) : 0;
}

// ---- dispatch: op-level switches become template constants; Exec runs the op (launch, or host emulation) ----

}  // namespace cuda

template <>
struct DispatchFailure<cudaError_t> {
  static cudaError_t value() { return cudaErrorInvalidValue; }
};

namespace cuda {

template <typename Exec>
cudaError_t run_q_sample(const QSampleArgs& a, Exec&& exec) {
  if (a.batch <= 0 || a.inner <= 0) return cudaSuccess;
  if (a.num_timesteps < 1) return cudaErrorInvalidValue;
  return dispatch_dtype<CudaTypes>(a.dtype, [&](auto st) {
    using scalar_t = typename decltype(st)::type;
    return exec.elementwise(QSampleOp<scalar_t>{a});
  });
}

template <typename Exec>
cudaError_t run_ddim_step(const DdimStepArgs& a, Exec&& exec) {
  if (a.batch <= 0 || a.inner <= 0) return cudaSuccess;
  if (a.num_timesteps < 1) return cudaErrorInvalidValue;
  const bool read_noise = a.noise.given.data != nullptr && a.eta != 0.0;
  return dispatch_dtype<CudaTypes>(a.dtype, [&](auto st) {
    using scalar_t = typename decltype(st)::type;
    return dispatch_prediction(a.prediction_type, [&](auto P) {
      return dispatch_bool(a.clip_denoised, [&](auto CLIP) {
        return exec.elementwise(DdimOp<scalar_t, decltype(P)::value, decltype(CLIP)::value>{a, read_noise});
      });
    });
  });
}

template <typename Exec>
cudaError_t run_ddpm_step(const DdpmStepArgs& a, Exec&& exec) {
  if (a.batch <= 0 || a.inner <= 0) return cudaSuccess;
  if (a.num_timesteps < 2) return cudaErrorInvalidValue;
  const bool learned = a.variance_type == kLearnedRange || a.variance_type == kLearned;
  if (learned && a.variance.data == nullptr) return cudaErrorInvalidValue;
  return dispatch_dtype<CudaTypes>(a.dtype, [&](auto st) {
    using scalar_t = typename decltype(st)::type;
    return dispatch_prediction(a.prediction_type, [&](auto P) {
      return dispatch_variance(a.variance_type, [&](auto VT) {
        return dispatch_bool(a.clip_denoised, [&](auto CLIP) {
          // both fixed types run DdpmOp<..., kFixedSmall, ...> (one instantiation): the element code is the same
          constexpr int kVT = decltype(VT)::value == kFixedLarge ? (int)kFixedSmall : decltype(VT)::value;
          return exec.elementwise(DdpmOp<scalar_t, decltype(P)::value, kVT, decltype(CLIP)::value>{a});
        });
      });
    });
  });
}

template <bool GRAD, typename F>
cudaError_t dispatch_hybrid(const HybridLossArgs& a, F&& f) {
  if (a.batch <= 0 || a.inner <= 0) return cudaSuccess;
  if (a.num_timesteps < 2) return cudaErrorInvalidValue;
  return dispatch_dtype<CudaTypes>(a.dtype, [&](auto st) {
    using scalar_t = typename decltype(st)::type;
    return dispatch_prediction(a.prediction_type, [&](auto P) {
      return dispatch_learned_variance(a.variance_type, [&](auto VT) {
        return f(HybridOp<scalar_t, decltype(P)::value, decltype(VT)::value, GRAD>{a});
      });
    });
  });
}

inline size_t hybrid_loss_forward_workspace_bytes_for(const HybridLossArgs& a) {
  if (a.batch <= 0 || a.inner <= 0) return 0;
  size_t bytes = 0;
  dispatch_dtype<CudaTypes>(a.dtype, [&](auto st) {
    using scalar_t = typename decltype(st)::type;
    bytes = hybrid_workspace_bytes(make_tile_shape(a.batch, a.inner, kVecOf<scalar_t>));
    return cudaSuccess;
  });
  return bytes;
}

// exec.reduce(op, workspace) writes a.mse / a.vb (per-sample means of the sums, in acc_t).
template <typename Exec>
cudaError_t run_hybrid_loss_forward(const HybridLossArgs& a, void* workspace, Exec&& exec) {
  if (hybrid_loss_forward_workspace_bytes_for(a) > 0 && workspace == nullptr) return cudaErrorInvalidValue;
  return dispatch_hybrid<false>(a, [&](auto op) { return exec.reduce(op, static_cast<double*>(workspace)); });
}

template <typename Exec>
cudaError_t run_hybrid_loss_backward(const HybridLossArgs& a, Exec&& exec) {
  return dispatch_hybrid<true>(a, [&](auto op) { return exec.elementwise(op); });
}

}  // namespace cuda
}  // namespace diffcore
