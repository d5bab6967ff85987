// CPU kernels of the fused ops: loops over (sample, contiguous segment) pairs run by the bindings' parallel-for;
// the math is the shared headers'. Element loops are branch-free after the op-level switches are turned into
// template constants, so the compiler vectorizes the ones without transcendental functions.
//
// Compiled once per instruction set (kernels_cpu.h): torch-free, no static initializers and no out-of-line
// standard-library templates, so that nothing compiled for AVX2 / AVX-512 can run before the run-time choice
// or be shared with another variant.
#include "cpu/kernels_cpu.h"

#include <stdint.h>

#include <type_traits>

#include "cpu/half.h"
#include "diffcore_math.h"
#include "dispatch.h"

#if !defined(DIFFCORE_CPU_ISA_NS) || !defined(DIFFCORE_CPU_ISA_NAME)
#error "compile kernels_cpu.cpp through setup.py: it defines DIFFCORE_CPU_ISA_NS and DIFFCORE_CPU_ISA_NAME"
#endif

namespace diffcore {
namespace cpu {
namespace DIFFCORE_CPU_ISA_NS {
namespace {

constexpr int64_t kGrain = 16384;  // elements per parallel task
constexpr int64_t kChunk = 256;    // elements per noise buffer

struct CpuTypes {
  using half = Half;
  using bfloat16 = BFloat16;
};

DC_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename T>
DC_HD void fill(T* begin, int64_t n, T value) {
  for (int64_t i = 0; i < n; ++i) begin[i] = value;
}

// Runs f(begin, end) over chunks of [0, n) through the bindings' parallel-for.
template <typename F>
void parallel_for(const Parallel& parallel, int64_t n, int64_t grain, F&& f) {
  using Fn = typename std::remove_reference<F>::type;
  parallel.run(n, grain, const_cast<void*>(static_cast<const void*>(&f)), [](void* ctx, int64_t begin, int64_t end) {
    (*static_cast<Fn*>(ctx))(begin, end);
  });
}

// Runs body(b, j_begin, j_end) over every contiguous segment of B rows of `inner` elements, in parallel.
template <typename F>
void for_each_segment(const Parallel& parallel, int64_t batch, int64_t inner, F&& body) {
  const int64_t total = batch * inner;
  if (total == 0) return;
  parallel_for(parallel, total, kGrain, [&](int64_t begin, int64_t end) {
    int64_t b = begin / inner, j = begin % inner;
    while (begin < end) {
      const int64_t len = min64(inner - j, end - begin);
      body(b, j, j + len);
      begin += len;
      ++b;
      j = 0;
    }
  });
}

// Noise of row b, elements [j0, j1) (j1 - j0 <= kChunk), into z: the given tensor, or Philox normals.
template <typename scalar_t, typename acc_t>
void load_noise(const Noise& noise, int64_t b, int64_t j0, int64_t j1, acc_t* z) {
  if (noise.given.data != nullptr) {
    const scalar_t* src = row<scalar_t>(noise.given, b);
    for (int64_t j = j0; j < j1; ++j) z[j - j0] = static_cast<acc_t>(src[j]);
    return;
  }
  // whole groups of 4 covering [j0, j1) into a buffer (a loop the compiler vectorizes), then the slice
  const int64_t g0 = j0 >> 2, g1 = (j1 + 3) >> 2;
  acc_t buffer[kChunk + 8];
  for (int64_t g = g0; g < g1; ++g) {
    const Normal4<acc_t> n = philox_normal4<acc_t>(noise.seed, noise.offset, noise.first_row, b, (uint64_t)g);
    for (int lane = 0; lane < 4; ++lane) buffer[4 * (g - g0) + lane] = n.v[lane];
  }
  for (int64_t j = j0; j < j1; ++j) z[j - j0] = buffer[j - 4 * g0];
}

bool q_sample(const QSampleArgs& a, const Parallel& parallel) {
  return dispatch_dtype<CpuTypes>(a.dtype, [&](auto scalar_tag) {
    using scalar_t = typename decltype(scalar_tag)::type;
    using acc_t = acc_type<scalar_t>;
    for_each_segment(parallel, a.batch, a.inner, [&](int64_t b, int64_t j0, int64_t j1) {
      const PredictCoeffs<acc_t> c = make_predict_coeffs<acc_t>(a.alphas_cumprod[a.t[b]]);
      const scalar_t* __restrict__ x0 = row<scalar_t>(a.x0, b);
      const scalar_t* __restrict__ noise = row<scalar_t>(a.noise, b);
      scalar_t* __restrict__ out = row<scalar_t>(a.out, b);
      for (int64_t j = j0; j < j1; ++j) {
        out[j] = static_cast<scalar_t>(
            q_sample_value(c, static_cast<acc_t>(x0[j]), static_cast<acc_t>(noise[j])));
      }
    });
    return true;
  });
}

bool ddim_step(const DdimStepArgs& a, const Parallel& parallel) {
  return dispatch_dtype<CpuTypes>(a.dtype, [&](auto scalar_tag) {
    using scalar_t = typename decltype(scalar_tag)::type;
    using acc_t = acc_type<scalar_t>;
    return dispatch_prediction(a.prediction_type, [&](auto P) {
      return dispatch_bool(a.clip_denoised, [&](auto CLIP) {
        for_each_segment(parallel, a.batch, a.inner, [&](int64_t b, int64_t j0, int64_t j1) {
          const DdimCoeffs<acc_t> c = make_ddim_coeffs<acc_t>(a.alphas_cumprod, a.t[b], a.t_prev[b], a.eta);
          const scalar_t* __restrict__ x = row<scalar_t>(a.x, b);
          const scalar_t* __restrict__ pred = row<scalar_t>(a.model_output, b);
          scalar_t* __restrict__ x_prev = row<scalar_t>(a.x_prev, b);
          scalar_t* __restrict__ pred_x0 = row<scalar_t>(a.pred_x0, b);
          acc_t z[kChunk];
          const bool noisy = ddim_takes_noise(a.noise.given.data != nullptr, a.eta, c.sigma);
          if (!noisy) fill(z, kChunk, (acc_t)0);
          for (int64_t k0 = j0; k0 < j1; k0 += kChunk) {
            const int64_t k1 = min64(k0 + kChunk, j1);
            if (noisy) load_noise<scalar_t, acc_t>(a.noise, b, k0, k1, z);
            for (int64_t j = k0; j < k1; ++j) {
              acc_t x0;
              const acc_t out = ddim_value<acc_t>(P(), CLIP(), c, static_cast<acc_t>(x[j]),
                                                  static_cast<acc_t>(pred[j]), z[j - k0], x0);
              x_prev[j] = static_cast<scalar_t>(out);
              pred_x0[j] = static_cast<scalar_t>(x0);
            }
          }
        });
        return true;
      });
    });
  });
}

bool ddpm_step(const DdpmStepArgs& a, const Parallel& parallel) {
  return dispatch_dtype<CpuTypes>(a.dtype, [&](auto scalar_tag) {
    using scalar_t = typename decltype(scalar_tag)::type;
    using acc_t = acc_type<scalar_t>;
    return dispatch_prediction(a.prediction_type, [&](auto P) {
      return dispatch_variance(a.variance_type, [&](auto VT) {
        return dispatch_bool(a.clip_denoised, [&](auto CLIP) {
          for_each_segment(parallel, a.batch, a.inner, [&](int64_t b, int64_t j0, int64_t j1) {
            const PosteriorCoeffs<acc_t> c = make_posterior_coeffs<acc_t>(a.alphas_cumprod, a.t[b], VT());
            const scalar_t* __restrict__ x = row<scalar_t>(a.x, b);
            const scalar_t* __restrict__ pred = row<scalar_t>(a.prediction, b);
            // fixed variances read no variance output: point at x so the load below is unconditional (the
            // compiler drops it as unused); a conditional load would keep the loop from vectorizing
            const scalar_t* __restrict__ var = a.variance.data ? row<scalar_t>(a.variance, b) : x;
            scalar_t* __restrict__ x_prev = row<scalar_t>(a.x_prev, b);
            scalar_t* __restrict__ pred_x0 = row<scalar_t>(a.pred_x0, b);
            acc_t z[kChunk];
            const bool noisy = ddpm_takes_noise(a.noise.given.data != nullptr, c.nonzero_t);
            if (!noisy) fill(z, kChunk, (acc_t)0);
            for (int64_t k0 = j0; k0 < j1; k0 += kChunk) {
              const int64_t k1 = min64(k0 + kChunk, j1);
              if (noisy) load_noise<scalar_t, acc_t>(a.noise, b, k0, k1, z);
              for (int64_t j = k0; j < k1; ++j) {
                const acc_t v = static_cast<acc_t>(var[j]);
                acc_t x0;
                const acc_t out = ddpm_value<acc_t>(P(), VT(), CLIP(), c, static_cast<acc_t>(x[j]),
                                                    static_cast<acc_t>(pred[j]), v, z[j - k0], x0);
                x_prev[j] = static_cast<scalar_t>(out);
                pred_x0[j] = static_cast<scalar_t>(x0);
              }
            }
          });
          return true;
        });
      });
    });
  });
}

// Runs body(b, terms_at) for every sample in parallel (one sample per task: the reductions are per sample and
// deterministic); terms_at(j) gives the hybrid-loss terms of element j. The t = 0 (decoder) / t > 0 (KL) choice is
// turned into a constant per sample so that the element loops have no branch and vectorize. False when a switch
// has a value outside its enum.
template <typename scalar_t, typename acc_t, typename F>
bool for_each_hybrid_sample(const HybridLossArgs& a, const Parallel& parallel, bool want_grad, F&& body) {
  return dispatch_prediction(a.prediction_type, [&](auto P) {
    return dispatch_learned_variance(a.variance_type, [&](auto VT) {
      parallel_for(parallel, a.batch, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const PosteriorCoeffs<acc_t> coeffs = make_posterior_coeffs<acc_t>(a.alphas_cumprod, a.t[b], VT());
          const scalar_t* __restrict__ pred = row<scalar_t>(a.prediction, b);
          const scalar_t* __restrict__ var = row<scalar_t>(a.variance, b);
          const scalar_t* __restrict__ x0 = row<scalar_t>(a.x0, b);
          const scalar_t* __restrict__ xt = row<scalar_t>(a.x_t, b);
          const scalar_t* __restrict__ noise = row<scalar_t>(a.noise, b);
          dispatch_bool(coeffs.nonzero_t, [&](auto NONZERO) {
            dispatch_bool(want_grad, [&](auto GRAD) {
              PosteriorCoeffs<acc_t> c = coeffs;
              c.nonzero_t = NONZERO();
              // c by value: the closure's own copy has nonzero_t as a known constant, so the t = 0 / t > 0
              // branch folds away and the element loops vectorize (by reference it is reloaded per element)
              body(b, [&, c](int64_t j) __attribute__((always_inline)) {
                return hybrid_terms<acc_t>(P(), VT(), c, static_cast<acc_t>(pred[j]), static_cast<acc_t>(var[j]),
                                           static_cast<acc_t>(x0[j]), static_cast<acc_t>(xt[j]),
                                           static_cast<acc_t>(noise[j]), GRAD());
              });
              return true;
            });
          });
        }
      });
      return true;
    });
  });
}

bool hybrid_loss_forward(const HybridLossArgs& a, const Parallel& parallel) {
  return dispatch_dtype<CpuTypes>(a.dtype, [&](auto scalar_tag) {
    using scalar_t = typename decltype(scalar_tag)::type;
    using acc_t = acc_type<scalar_t>;
    acc_t* mse = static_cast<acc_t*>(a.mse);
    acc_t* vb = static_cast<acc_t*>(a.vb);
    // Sums in kLanes independent acc_t lanes over blocks of kBlock elements (vectorizable, deterministic), the
    // block totals in double.
    constexpr int64_t kLanes = 16, kBlock = 1024;
    return for_each_hybrid_sample<scalar_t, acc_t>(a, parallel, false, [&](int64_t b, auto&& terms_at) {
      double total_sq = 0.0, total_vb = 0.0;
      for (int64_t k0 = 0; k0 < a.inner; k0 += kBlock) {
        const int64_t k1 = min64(k0 + kBlock, a.inner);
        acc_t lane_sq[kLanes] = {}, lane_vb[kLanes] = {};
        int64_t j = k0;
        for (; j + kLanes <= k1; j += kLanes) {
          for (int64_t l = 0; l < kLanes; ++l) {
            const HybridTerms<acc_t> terms = terms_at(j + l);
            lane_sq[l] += terms.sq_err;
            lane_vb[l] += terms.vb_bits;
          }
        }
        for (; j < k1; ++j) {
          const HybridTerms<acc_t> terms = terms_at(j);
          lane_sq[0] += terms.sq_err;
          lane_vb[0] += terms.vb_bits;
        }
        for (int64_t l = 0; l < kLanes; ++l) {
          total_sq += (double)lane_sq[l];
          total_vb += (double)lane_vb[l];
        }
      }
      mse[b] = (acc_t)(a.inner > 0 ? total_sq / (double)a.inner : NAN);
      vb[b] = (acc_t)(a.inner > 0 ? total_vb / (double)a.inner : NAN);
    });
  });
}

bool hybrid_loss_backward(const HybridLossArgs& a, const Parallel& parallel) {
  return dispatch_dtype<CpuTypes>(a.dtype, [&](auto scalar_tag) {
    using scalar_t = typename decltype(scalar_tag)::type;
    using acc_t = acc_type<scalar_t>;
    const acc_t inv_n = a.inner > 0 ? (acc_t)(1.0 / (double)a.inner) : (acc_t)0;
    return for_each_hybrid_sample<scalar_t, acc_t>(a, parallel, true, [&](int64_t b, auto&& terms_at) {
      const acc_t scale_mse = static_cast<const acc_t*>(a.grad_mse)[b] * inv_n;
      const acc_t scale_vb = static_cast<const acc_t*>(a.grad_vb)[b] * inv_n;
      scalar_t* __restrict__ grad_pred = row<scalar_t>(a.grad_prediction, b);
      scalar_t* __restrict__ grad_var = row<scalar_t>(a.grad_variance, b);
#pragma GCC ivdep
      for (int64_t j = 0; j < a.inner; ++j) {  // the outputs are rows of a fresh tensor: no aliasing
        const HybridTerms<acc_t> terms = terms_at(j);
        grad_pred[j] = static_cast<scalar_t>(scale_mse * terms.d_sq_err_d_pred);
        grad_var[j] = static_cast<scalar_t>(scale_vb * terms.d_vb_d_v);
      }
    });
  });
}

// Constant-initialized (no code runs at load time).
constexpr Kernels kKernels{DIFFCORE_CPU_ISA_NAME, q_sample, ddim_step, ddpm_step, hybrid_loss_forward,
                           hybrid_loss_backward};

}  // namespace

const Kernels& kernels() { return kKernels; }

}  // namespace DIFFCORE_CPU_ISA_NS
}  // namespace cpu
}  // namespace diffcore
