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

// ---- group_norm_act ----
//
// Parallel over the flattened (image, group) index; a task takes a run of groups of one image at a time. Both
// passes go through two micro-kernels over "rows" of W = kNormWidth values (row r at x + r * stride): W
// consecutive values of an NCHW group (stride W), or W channels of one position in channels_last (stride C).
// W is a compile-time constant, so each row is one or two vector registers on AVX-512 (more on AVX2 and SSE2) and
// the accumulators stay in registers. Sums of (x - pivot) and (x - pivot)^2 (pivot, formulas.h: the group's first
// value in NCHW, each channel's first value in channels_last) are float for kNormRows rows, then double; the
// moments are merged in double and folded into per-channel (pivot, a, d); the second pass writes
// y = silu((x - pivot) a + d).

constexpr int kNormWidth = 16;      // values per row
constexpr int64_t kNormRows = 64;   // rows per float partial sum

// The micro-kernels below must vectorize over the W values of a row, never across rows: GCC, given a constant
// stride (an NCHW plane's W) through a cloned copy, vectorizes the row loop instead, with transposing permutes
// (several times slower). Neither inlined nor cloned, they keep the stride a run-time value.
#if defined(__GNUC__) && !defined(__clang__)
#define DC_ROW_KERNEL __attribute__((noinline, noclone))
#else
#define DC_ROW_KERNEL __attribute__((noinline))
#endif

// The scratch of image b (GroupNormArgs::workspace): per-channel double sums, then acc_t arrays.
template <typename acc_t>
struct NormWork {
  double* sum;
  double* sum_sq;
  acc_t* pivot;
  acc_t* a;
  acc_t* d;
};

template <typename acc_t>
NormWork<acc_t> norm_work(const GroupNormArgs& a, int64_t b) {
  static_assert(sizeof(acc_t) <= sizeof(double), "three acc_t arrays fit in three double arrays");
  static_assert(kGroupNormWorkDoubles == 5, "two double arrays and three acc_t arrays of C values per image");
  const int64_t C = a.channels;
  double* base = a.workspace + b * C * kGroupNormWorkDoubles;
  acc_t* r = reinterpret_cast<acc_t*>(base + 2 * C);
  return NormWork<acc_t>{base, base + C, r, r + C, r + 2 * C};
}

// Adds the shifted sums of `rows` rows of W values (lane k against pivot[k]) to sum[k] and sum_sq[k].
template <int W, typename scalar_t, typename acc_t>
DC_ROW_KERNEL void shifted_sums(const scalar_t* __restrict__ x, int64_t stride, int64_t rows, const acc_t* pivot_in,
                  double* __restrict__ sum, double* __restrict__ sum_sq) {
  acc_t pivot[W];
  for (int k = 0; k < W; ++k) pivot[k] = pivot_in[k];
  for (int64_t r0 = 0; r0 < rows; r0 += kNormRows) {
    const int64_t r1 = min64(r0 + kNormRows, rows);
    acc_t s[W] = {}, q[W] = {};
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* __restrict__ xr = x + r * stride;
      for (int k = 0; k < W; ++k) {
        const acc_t v = static_cast<acc_t>(xr[k]) - pivot[k];
        s[k] += v;
        q[k] = dc_fma(v, v, q[k]);
      }
    }
    for (int k = 0; k < W; ++k) {
      sum[k] += (double)s[k];
      sum_sq[k] += (double)q[k];
    }
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
// The AVX-512 variants' micro-kernel for the hot rows (channels_last, 32 bfloat16 or 16 float32 values per row):
// the portable formula (group_norm_act_value, dc_silu, c10's bfloat16 rounding) on whole __m512 vectors, with the
// exp polynomial shared (dc_exp_poly) and the rest written with instructions the compiler does not pick from the
// portable code: 2^n by vscalefps (exact, as dc_silu's exponent-bit add, p 2^n being normal there), the zero below
// e^-87.33 by zero-masking it, the y < 0 select by a masked multiply; the same fused multiply-adds and the same
// correctly rounded division, so the values equal the portable code's (tests/test_group_norm_act.py checks them
// against the AVX2 variant's). Two rows per iteration (more independent work in flight: 4% faster on Zen 4).
// GCC 12 takes the intrinsics' _mm512_undefined_* operands for uninitialized values (-Wmaybe-uninitialized)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace avx512 {

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const BFloat16* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

// c10's bfloat16 rounding (cpu_half::bfloat16_from_float) in the upper 16 bits of each 32-bit lane: round to
// nearest even, NaN -> 0x7FC0.
inline __m512i bfloat16_bits_high(__m512 v) {
  const __m512i w = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(w, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(w, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
}

// 32 floats (lo: the first 16) to bfloat16 as c10 rounds them.
inline void store32(BFloat16* p, __m512 lo, __m512 hi) {
#if defined(__AVX512BF16__)
  // vcvtne2ps2bf16 (one instruction for 32 values) rounds to nearest even as c10 does, but reads and writes
  // denormals as zero and keeps a NaN's sign and payload: vectors with a NaN or a denormal take the integer path.
  constexpr int kNanOrDenormal = 0x01 | 0x20 | 0x80;  // vfpclassps: quiet NaN, denormal, signalling NaN
  if ((_mm512_fpclass_ps_mask(lo, kNanOrDenormal) | _mm512_fpclass_ps_mask(hi, kNanOrDenormal)) == 0) {
    _mm512_storeu_si512(p, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    return;
  }
#endif
  // word j of the result: the upper half of lane j of (lo, hi), i.e. word 2 j + 1 of the pair
  const __m512i odd_words = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31,
                                             29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  _mm512_storeu_si512(p, _mm512_permutex2var_epi16(bfloat16_bits_high(lo), odd_words, bfloat16_bits_high(hi)));
}

// dc_silu<kStore16>(y) on 16 floats.
template <bool kStore16>
inline __m512 silu(__m512 y) {
  const __m512 limit = _mm512_set1_ps(-87.33f);
  const __m512 t = _mm512_or_ps(y, _mm512_set1_ps(-0.0f));          // -|y|
  const __mmask16 live = _mm512_cmp_ps_mask(t, limit, _CMP_NLT_UQ);  // e = 0 below the limit
  __m512 k;
  const __m512 p = dc_exp_poly<kStore16 ? 4 : 5>(_mm512_max_ps(limit, t), &k);
  const __m512 e = _mm512_maskz_scalef_ps(live, p, _mm512_sub_ps(k, _mm512_set1_ps(12582912.0f)));
  const __m512 num = _mm512_mask_mul_ps(y, _mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_LT_OQ), y, e);
  return _mm512_div_ps(num, _mm512_add_ps(e, _mm512_set1_ps(1.0f)));
}

// apply_rows (below) for W = 16 float32 or W = 32 bfloat16 values per row.
template <int W, typename scalar_t, bool kSilu>
void apply_rows(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t stride, int64_t rows,
                const float* pivot_in, const float* a_in, const float* d_in) {
  constexpr int V = W / 16;  // vectors per row
  constexpr bool k16 = sizeof(scalar_t) == 2;
  __m512 pivot[V], ca[V], cd[V];
  for (int v = 0; v < V; ++v) {
    pivot[v] = _mm512_loadu_ps(pivot_in + 16 * v);
    ca[v] = _mm512_loadu_ps(a_in + 16 * v);
    cd[v] = _mm512_loadu_ps(d_in + 16 * v);
  }
  int64_t r = 0;
  auto run = [&](auto count) {  // rows r, ..., r + count - 1
    constexpr int kRows = decltype(count)::value;
    __m512 y[kRows][V];
    for (int i = 0; i < kRows; ++i) {
      for (int v = 0; v < V; ++v) {
        y[i][v] = _mm512_fmadd_ps(_mm512_sub_ps(load16(x + (r + i) * stride + 16 * v), pivot[v]), ca[v], cd[v]);
        if (kSilu) y[i][v] = silu<k16>(y[i][v]);
      }
    }
    for (int i = 0; i < kRows; ++i) {
      if constexpr (k16) {
        store32(out + (r + i) * stride, y[i][0], y[i][1]);
      } else {
        _mm512_storeu_ps(out + (r + i) * stride, y[i][0]);
      }
    }
  };
  for (; r + 2 <= rows; r += 2) run(Int<2>{});
  if (r < rows) run(Int<1>{});
}

}  // namespace avx512
#pragma GCC diagnostic pop
#endif

// out = silu((x - pivot) a + d) over `rows` rows of W values, lane k with coefficients [k].
template <int W, typename scalar_t, typename acc_t, typename SILU>
DC_ROW_KERNEL void apply_rows(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t stride, int64_t rows,
                const acc_t* pivot_in, const acc_t* a_in, const acc_t* d_in) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
  if constexpr ((std::is_same<scalar_t, BFloat16>::value && W == 32) ||
                (std::is_same<scalar_t, float>::value && W == 16)) {
    avx512::apply_rows<W, scalar_t, SILU::value>(x, out, stride, rows, pivot_in, a_in, d_in);
    return;
  }
#endif
  acc_t pivot[W], ca[W], cd[W];
  for (int k = 0; k < W; ++k) {
    pivot[k] = pivot_in[k];
    ca[k] = a_in[k];
    cd[k] = d_in[k];
  }
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* __restrict__ xr = x + r * stride;
    scalar_t* __restrict__ outr = out + r * stride;
    for (int k = 0; k < W; ++k) {
      outr[k] = static_cast<scalar_t>(group_norm_act_value<acc_t, sizeof(scalar_t) == 2>(
          SILU(), pivot[k], ca[k], cd[k], static_cast<acc_t>(xr[k])));
    }
  }
}

// NCHW: out = silu((x - pivot) a + d) over `rows` rows of W consecutive values (x, out: the first row),
// the first row starting at value `first` of a run of planes of S >= W values. Lane k takes the coefficients of
// its own channel (arrays over the run's channels, the last one `last_channel`): a row spans at most two planes,
// so each lane selects between two channels.
template <int W, typename scalar_t, typename acc_t, typename SILU>
DC_ROW_KERNEL void apply_plane_rows(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t first,
                                    int64_t rows, int64_t S, int64_t last_channel, const acc_t* pivot,
                                    const acc_t* a, const acc_t* d) {
  int64_t c = first / S, plane_end = (c + 1) * S;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t pos = first + r * W;
    if (pos >= plane_end) {
      ++c;
      plane_end += S;
    }
    const int64_t split = plane_end - pos;  // lanes from here on belong to channel c + 1
    const int64_t c1 = c < last_channel ? c + 1 : c;
    const acc_t p0 = pivot[c], p1 = pivot[c1];
    const acc_t a0 = a[c], a1 = a[c1], d0 = d[c], d1 = d[c1];
    const scalar_t* __restrict__ xr = x + r * W;
    scalar_t* __restrict__ outr = out + r * W;
    for (int k = 0; k < W; ++k) {
      const bool second = k >= split;
      outr[k] = static_cast<scalar_t>(group_norm_act_value<acc_t, sizeof(scalar_t) == 2>(
          SILU(), second ? p1 : p0, second ? a1 : a0, second ? d1 : d0,
          static_cast<acc_t>(xr[k])));
    }
  }
}

// Folds the moments of group g of image b with weight, bias, scale and shift into the per-channel coefficients
// (w.pivot must hold the channels' pivots).
template <typename acc_t>
void finish_group(const GroupNormArgs& a, const NormWork<acc_t>& w, int64_t b, int64_t g, const Moments& m) {
  const int64_t per_group = a.channels / a.groups;
  const acc_t* weight = static_cast<const acc_t*>(a.weight);
  const acc_t* bias = static_cast<const acc_t*>(a.bias);
  const acc_t* scale = a.scale ? static_cast<const acc_t*>(a.scale) + b * a.channels : nullptr;
  const acc_t* shift = a.shift ? static_cast<const acc_t*>(a.shift) + b * a.channels : nullptr;
  const GroupStats stats = group_stats(m, a.eps);
  for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
    const GroupNormCoeffs<acc_t> k = group_norm_coeffs<acc_t>(
        stats, w.pivot[c], weight ? weight[c] : (acc_t)1, bias ? bias[c] : (acc_t)0, scale ? scale[c] : (acc_t)0,
        shift ? shift[c] : (acc_t)0);
    w.a[c] = k.a;
    w.d[c] = k.d;
  }
}

// Runs f(Int<w>{}, first, count) over [0, n) in pieces of `count` rows of w values: rows of W values, then of 16
// (when W > 16), then single values; pieces without rows are skipped. W is 32 for 16-bit storage (one 64-byte
// vector of it), 16 otherwise.
template <typename scalar_t, typename F>
void for_each_width(int64_t n, F&& f) {
  constexpr int W = sizeof(scalar_t) == 2 ? 2 * kNormWidth : kNormWidth;
  const int64_t wide = n / W * W, narrow = wide + (n - wide) / kNormWidth * kNormWidth;
  if (wide > 0) f(Int<W>{}, (int64_t)0, wide / W);
  if (W > kNormWidth && narrow > wide) f(Int<kNormWidth>{}, wide, (narrow - wide) / kNormWidth);
  if (n > narrow) f(Int<1>{}, narrow, n - narrow);
}

// NCHW: groups [g0, g1) of image b (a run of contiguous planes). A group's C/G planes are one contiguous run of
// values: its sums take one pivot (the group's first value) over the whole run. The second pass goes over the
// whole run of planes in rows of W (apply_plane_rows), then a padded row for the rest.
template <typename scalar_t, typename acc_t, typename SILU>
void group_norm_nchw(const GroupNormArgs& a, int64_t b, int64_t g0, int64_t g1) {
  constexpr int kMax = 2 * kNormWidth;
  const int64_t S = a.spatial, per_group = a.channels / a.groups;
  const NormWork<acc_t> w = norm_work<acc_t>(a, b);
  for (int64_t g = g0; g < g1; ++g) {
    const scalar_t* xg = static_cast<const scalar_t*>(a.x) + (b * a.channels + g * per_group) * S;
    acc_t pivot[kMax];
    double sum[kMax] = {}, sum_sq[kMax] = {};
    fill(pivot, kMax, static_cast<acc_t>(xg[0]));
    for_each_width<scalar_t>(per_group * S, [&](auto width, int64_t first, int64_t rows) {
      shifted_sums<decltype(width)::value>(xg + first, decltype(width)::value, rows, pivot, sum, sum_sq);
    });
    double total = 0.0, total_sq = 0.0;
    for (int k = 0; k < kMax; ++k) {
      total += sum[k];
      total_sq += sum_sq[k];
    }
    for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) w.pivot[c] = pivot[0];
    finish_group<acc_t>(a, w, b, g, moments_from_shifted_sums((double)(per_group * S), (double)pivot[0], total,
                                                              total_sq));
  }
  // second pass over the run of planes of groups [g0, g1)
  constexpr int W = sizeof(scalar_t) == 2 ? 2 * kNormWidth : kNormWidth;
  const int64_t c0 = g0 * per_group, c1 = g1 * per_group, n = (c1 - c0) * S;
  const scalar_t* x = static_cast<const scalar_t*>(a.x) + (b * a.channels + c0) * S;
  scalar_t* out = static_cast<scalar_t*>(a.out) + (b * a.channels + c0) * S;
  if (S >= W) {
    const int64_t body = n / W * W, tail = n - body;
    const int64_t last = c1 - c0 - 1;
    apply_plane_rows<W, scalar_t, acc_t, SILU>(x, out, 0, n / W, S, last, w.pivot + c0, w.a + c0, w.d + c0);
    if (tail > 0) {  // one more vector row through a padded copy (cheaper than tail values one at a time)
      scalar_t in_row[W], out_row[W];
      for (int k = 0; k < W; ++k) in_row[k] = x[body + (k < tail ? k : 0)];
      apply_plane_rows<W, scalar_t, acc_t, SILU>(in_row, out_row, body, 1, S, last, w.pivot + c0, w.a + c0,
                                                 w.d + c0);
      for (int64_t k = 0; k < tail; ++k) out[body + k] = out_row[k];
    }
  } else {  // planes smaller than a row: one value at a time
    for (int64_t c = 0; c < c1 - c0; ++c) {
      apply_rows<1, scalar_t, acc_t, SILU>(x + c * S, out + c * S, 1, S, w.pivot + c0 + c, w.a + c0 + c,
                                           w.d + c0 + c);
    }
  }
}

// channels_last: channels [g0 C/G, g1 C/G) of image b at every position, in blocks of channels (rows of stride C,
// for_each_width over the channels).
template <typename scalar_t, typename acc_t, typename SILU>
void group_norm_nhwc(const GroupNormArgs& a, int64_t b, int64_t g0, int64_t g1) {
  const int64_t S = a.spatial, C = a.channels, per_group = C / a.groups;
  const int64_t c0 = g0 * per_group, n = (g1 - g0) * per_group;
  const NormWork<acc_t> w = norm_work<acc_t>(a, b);
  const scalar_t* x = static_cast<const scalar_t*>(a.x) + b * S * C + c0;
  scalar_t* out = static_cast<scalar_t*>(a.out) + b * S * C + c0;
  acc_t* pivot = w.pivot + c0;
  double* sum = w.sum + c0;
  double* sum_sq = w.sum_sq + c0;
  for (int64_t c = 0; c < n; ++c) {
    pivot[c] = static_cast<acc_t>(x[c]);
    sum[c] = 0.0;
    sum_sq[c] = 0.0;
  }
  for_each_width<scalar_t>(n, [&](auto width, int64_t first, int64_t blocks) {
    constexpr int kW = decltype(width)::value;
    for (int64_t c = first; c < first + blocks * kW; c += kW) {
      shifted_sums<kW>(x + c, C, S, pivot + c, sum + c, sum_sq + c);
    }
  });
  for (int64_t g = g0; g < g1; ++g) {
    Moments m{0.0, 0.0, 0.0};
    for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
      m = merge_moments(m, moments_from_shifted_sums((double)S, (double)w.pivot[c], w.sum[c], w.sum_sq[c]));
    }
    finish_group<acc_t>(a, w, b, g, m);
  }
  const acc_t* ca = w.a + c0;
  const acc_t* cd = w.d + c0;
  for_each_width<scalar_t>(n, [&](auto width, int64_t first, int64_t blocks) {
    constexpr int kW = decltype(width)::value;
    for (int64_t c = first; c < first + blocks * kW; c += kW) {
      apply_rows<kW, scalar_t, acc_t, SILU>(x + c, out + c, C, S, pivot + c, ca + c, cd + c);
    }
  });
}

bool group_norm_act(const GroupNormArgs& a, const Parallel& parallel) {
  if (a.groups <= 0 || a.channels % a.groups != 0 || a.workspace == nullptr) return false;
  return dispatch_dtype<CpuTypes>(a.dtype, [&](auto scalar_tag) {
    using scalar_t = typename decltype(scalar_tag)::type;
    using acc_t = acc_type<scalar_t>;
    return dispatch_bool(a.silu, [&](auto SILU) {
      const int64_t G = a.groups, group_numel = (a.channels / G) * a.spatial;
      const int64_t grain = group_numel >= kGrain ? 1 : kGrain / (group_numel > 0 ? group_numel : 1);
      parallel_for(parallel, a.batch * G, grain, [&](int64_t begin, int64_t end) {
        while (begin < end) {
          const int64_t b = begin / G, g0 = begin % G, g1 = min64(G, g0 + (end - begin));
          if (a.channels_last) {
            group_norm_nhwc<scalar_t, acc_t, decltype(SILU)>(a, b, g0, g1);
          } else {
            group_norm_nchw<scalar_t, acc_t, decltype(SILU)>(a, b, g0, g1);
          }
          begin += g1 - g0;
        }
      });
      return true;
    });
  });
}

}  // namespace

}  // namespace DIFFCORE_CPU_ISA_NS
}  // namespace cpu
}  // namespace diffcore

// ---- attention_qkv ----
//
// Parallel over (sequence, head) pairs. A task copies its sequence's queries, keys transposed (kt[c][j], zero for
// the padded keys j >= T up to Tp, a multiple of kAttnLanes) and values (v[j][c], zero for the padded channels
// c >= d up to dp) of every head into a float scratch (double for float64), then takes a head's queries in tiles of R rows (kAttnRows, then 4, 2
// and 1 for the last T % kAttnRows): scores of the tile against kAttnLanes keys at a time (R vector accumulators,
// a multiply and an add per channel), softmax per row (padded keys score -inf, weight 0), and the weighted sum of
// the values kAttnLanes channels at a time. The tiles use GCC / clang vector types of kAttnLanes values (plain
// arithmetic: one register on AVX-512 for float, two on AVX2, four on SSE2): left to itself, the auto-vectorizer
// vectorizes these loops over the channel (the reduction) with transposing permutes instead. The scratch,
// O(T (3 C + rows)), is allocated once per parallel chunk.
#include <stdlib.h>  // posix_memalign, free
#include <string.h>  // memcpy


namespace diffcore {
namespace cpu {
namespace DIFFCORE_CPU_ISA_NS {
namespace {

constexpr int kAttnLanes = 16;     // keys per score tile, channels per output tile
constexpr int kAttnRows = 8;       // query rows per tile
constexpr int64_t kAttnAlign = 64;  // bytes

// Out of line: each kernel is compiled for its loops alone (as the group_norm row kernels are).
#define DC_ATTN_KERNEL __attribute__((noinline))

DC_HD int64_t attn_round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// The scratch of one sequence (every head), in acc_t values, each array padded to kAttnLanes values (64 bytes).
// head(h) points kt, v and q at head h's part.
template <typename acc_t>
struct AttnScratch {
  int64_t tokens, padded_tokens, heads, head_dim, padded_dim;
  acc_t* kt_all;  // [heads][head_dim][padded_tokens]
  acc_t* v_all;   // [heads][tokens][padded_dim]
  acc_t* q_all;   // [heads][tokens][head_dim]
  acc_t* p;       // [kAttnRows][padded_tokens]: scores, then softmax weights
  acc_t* kt;      // head h's keys, values and queries (head())
  acc_t* v;
  acc_t* q;

  static int64_t values(int64_t tokens, int64_t heads, int64_t head_dim) {
    const int64_t tp = attn_round_up(tokens, kAttnLanes), dp = attn_round_up(head_dim, kAttnLanes);
    return heads * (head_dim * tp + tokens * dp) + attn_round_up(heads * tokens * head_dim, kAttnLanes) +
           kAttnRows * tp;
  }

  AttnScratch(acc_t* base, int64_t t, int64_t h, int64_t d)
      : tokens(t), padded_tokens(attn_round_up(t, kAttnLanes)), heads(h), head_dim(d),
        padded_dim(attn_round_up(d, kAttnLanes)) {
    kt_all = base;
    v_all = kt_all + heads * head_dim * padded_tokens;
    q_all = v_all + heads * tokens * padded_dim;
    p = q_all + attn_round_up(heads * tokens * head_dim, kAttnLanes);
    head(0);
  }

  void head(int64_t h) {
    kt = kt_all + h * head_dim * padded_tokens;
    v = v_all + h * tokens * padded_dim;
    q = q_all + h * tokens * head_dim;
  }
};

// Copies the queries, keys (transposed) and values of every head of sequence b into the scratch, reading the
// sequence's token rows in order (each row's 3 C features are contiguous).
template <typename scalar_t, typename acc_t>
void attn_load_sequence(const AttentionArgs& a, int64_t b, const AttnScratch<acc_t>& w) {
  const int64_t T = a.tokens, H = a.heads, d = a.head_dim, C = H * d, Tp = w.padded_tokens, dp = w.padded_dim;
  const scalar_t* seq = static_cast<const scalar_t*>(a.qkv) + b * a.batch_stride;
  for (int64_t j = 0; j < T; ++j) {
    const scalar_t* row = seq + j * a.token_stride;
    for (int64_t h = 0; h < H; ++h) {
      const scalar_t* q = row + h * d;
      const scalar_t* k = q + C;
      const scalar_t* v = k + C;
      acc_t* qd = w.q_all + (h * T + j) * d;
      for (int64_t c = 0; c < d; ++c) qd[c] = static_cast<acc_t>(q[c]);
      acc_t* kd = w.kt_all + h * d * Tp + j;
      for (int64_t c = 0; c < d; ++c) kd[c * Tp] = static_cast<acc_t>(k[c]);
      acc_t* vd = w.v_all + (h * T + j) * dp;
      for (int64_t c = 0; c < d; ++c) vd[c] = static_cast<acc_t>(v[c]);
      for (int64_t c = d; c < dp; ++c) vd[c] = (acc_t)0;
    }
  }
  for (int64_t hc = 0; hc < H * d; ++hc) {
    for (int64_t j = T; j < Tp; ++j) w.kt_all[hc * Tp + j] = (acc_t)0;
  }
}

// kAttnLanes values of acc_t in one vector type.
template <typename acc_t>
struct AttnVec {
  typedef acc_t type __attribute__((vector_size(kAttnLanes * sizeof(acc_t))));
};

template <typename V>
DC_HD void attn_load(V& v, const void* p) {
  memcpy(&v, p, sizeof(V));
}

// p[r][j] = (q_r . k_j) scale for the R query rows at q (R x d), -inf for the padded keys j >= T.
template <int R, typename acc_t>
DC_ATTN_KERNEL void attn_scores(const AttnScratch<acc_t>& w, const acc_t* __restrict__ q, acc_t scale) {
  using V = typename AttnVec<acc_t>::type;
  const int64_t T = w.tokens, Tp = w.padded_tokens, d = w.head_dim;
  for (int64_t j0 = 0; j0 < Tp; j0 += kAttnLanes) {
    V s[R] = {};
    for (int64_t c = 0; c < d; ++c) {
      V kv;
      attn_load(kv, w.kt + c * Tp + j0);
      _Pragma("GCC unroll 16") for (int r = 0; r < R; ++r) s[r] += q[r * d + c] * kv;
    }
    _Pragma("GCC unroll 16") for (int r = 0; r < R; ++r) {
      const V scaled = s[r] * scale;
      memcpy(w.p + r * Tp + j0, &scaled, sizeof(V));
    }
  }
  for (int r = 0; r < R; ++r) {  // the padded keys get weight exp(-inf) = 0
    for (int64_t j = T; j < Tp; ++j) w.p[r * Tp + j] = (acc_t)-INFINITY;
  }
}

// a = a + b, or the NaN-propagating max of a and b (dc_max), lane by lane.
template <bool kMax, typename V>
DC_HD void attn_combine(V& a, const V& b) {
  if (kMax) {
    a = (a > b) | (a != a) ? a : b;
  } else {
    a += b;
  }
}

// The sum (or NaN-propagating max) of the 16 lanes of v by a tree of halves (lane i with lane i + 8, then i + 4,
// i + 2, i + 1). Plain array code, which any C++17 compiler takes (GCC's __builtin_shufflevector needs GCC 12).
template <typename acc_t, bool kMax, typename V>
DC_HD acc_t attn_reduce_lanes(const V& v) {
  static_assert(kAttnLanes == 16, "a tree over 16 lanes");
  acc_t lane[kAttnLanes];
  memcpy(lane, &v, sizeof(lane));
  for (int half = kAttnLanes / 2; half >= 1; half /= 2) {
    for (int i = 0; i < half; ++i) lane[i] = kMax ? dc_max(lane[i], lane[i + half]) : lane[i] + lane[i + half];
  }
  return lane[0];
}

// The R rows of p from scores to unnormalized weights e_j = exp(s_j - max_j s_j); inv_total[r] = 1 / sum_j e_j.
// Phase by phase over the rows, so that their independent reductions overlap.
template <int R, typename acc_t>
DC_ATTN_KERNEL void attn_softmax(const AttnScratch<acc_t>& w, acc_t* inv_total) {
  using V = typename AttnVec<acc_t>::type;
  const int64_t Tp = w.padded_tokens;
  acc_t* __restrict__ p = w.p;
  V acc[R];
  V x;
  _Pragma("GCC unroll 16") for (int r = 0; r < R; ++r) attn_load(acc[r], p + r * Tp);
  for (int64_t j0 = kAttnLanes; j0 < Tp; j0 += kAttnLanes) {
    _Pragma("GCC unroll 16") for (int r = 0; r < R; ++r) {
      attn_load(x, p + r * Tp + j0);
      attn_combine<true>(acc[r], x);
    }
  }
  acc_t m[R];
  _Pragma("GCC unroll 16") for (int r = 0; r < R; ++r) m[r] = attn_reduce_lanes<acc_t, true>(acc[r]);
  for (int r = 0; r < R; ++r) {
    acc_t* __restrict__ pr = p + r * Tp;
    const acc_t mr = m[r];
    for (int64_t j = 0; j < Tp; ++j) pr[j] = softmax_term(pr[j], mr);
  }
  _Pragma("GCC unroll 16") for (int r = 0; r < R; ++r) attn_load(acc[r], p + r * Tp);
  for (int64_t j0 = kAttnLanes; j0 < Tp; j0 += kAttnLanes) {
    _Pragma("GCC unroll 16") for (int r = 0; r < R; ++r) {
      attn_load(x, p + r * Tp + j0);
      acc[r] += x;
    }
  }
  _Pragma("GCC unroll 16") for (int r = 0; r < R; ++r) {
    inv_total[r] = (acc_t)1 / attn_reduce_lanes<acc_t, false>(acc[r]);
  }
}

// o[r][k] = sum_{j < T} p[r][j] v[j][c0 + k] for the R rows, kAttnLanes channels from c0.
template <int R, typename acc_t>
DC_ATTN_KERNEL void attn_weighted_values(const AttnScratch<acc_t>& w, int64_t c0, acc_t (*o)[kAttnLanes]) {
  using V = typename AttnVec<acc_t>::type;
  const int64_t T = w.tokens, Tp = w.padded_tokens, dp = w.padded_dim;
  const acc_t* __restrict__ p = w.p;
  V acc[R] = {};
  for (int64_t j = 0; j < T; ++j) {
    V vv;
    attn_load(vv, w.v + j * dp + c0);
    _Pragma("GCC unroll 16") for (int r = 0; r < R; ++r) acc[r] += p[r * Tp + j] * vv;
  }
  for (int r = 0; r < R; ++r) memcpy(o[r], &acc[r], sizeof(V));
}

// Query rows [i0, i0 + R) of head h of sequence b (w: the sequence loaded, pointed at head h).
template <int R, typename scalar_t, typename acc_t>
void attn_tile(const AttentionArgs& a, int64_t b, int64_t h, int64_t i0, const AttnScratch<acc_t>& w, acc_t scale) {
  const int64_t T = a.tokens, d = a.head_dim, C = a.heads * d;
  attn_scores<R, acc_t>(w, w.q + i0 * d, scale);
  acc_t inv_total[R];
  attn_softmax<R, acc_t>(w, inv_total);
  scalar_t* out = static_cast<scalar_t*>(a.out) + (b * T + i0) * C + h * d;
  for (int64_t c0 = 0; c0 < d; c0 += kAttnLanes) {
    acc_t o[R][kAttnLanes];
    attn_weighted_values<R, acc_t>(w, c0, o);
    const int64_t width = min64(kAttnLanes, d - c0);
    for (int r = 0; r < R; ++r) {
      scalar_t* outr = out + r * C + c0;
      for (int64_t k = 0; k < width; ++k) outr[k] = static_cast<scalar_t>(softmax_output(o[r][k], inv_total[r]));
    }
  }
}

// Head h of sequence b (w: the sequence loaded).
template <typename scalar_t, typename acc_t>
void attn_head(const AttentionArgs& a, int64_t b, int64_t h, AttnScratch<acc_t>& w) {
  static_assert(kAttnRows == 8, "tiles of 8 rows, then 4, 2 and 1");
  const int64_t T = a.tokens;
  const acc_t scale = attention_scale<acc_t>(a.head_dim);
  w.head(h);
  int64_t i0 = 0;
  for (; i0 + kAttnRows <= T; i0 += kAttnRows) attn_tile<kAttnRows, scalar_t>(a, b, h, i0, w, scale);
  if ((T - i0) & 4) {
    attn_tile<4, scalar_t>(a, b, h, i0, w, scale);
    i0 += 4;
  }
  if ((T - i0) & 2) {
    attn_tile<2, scalar_t>(a, b, h, i0, w, scale);
    i0 += 2;
  }
  if ((T - i0) & 1) attn_tile<1, scalar_t>(a, b, h, i0, w, scale);
}

// Parallel over the (sequence, head) pairs; a chunk loads each sequence it touches once (all heads: one pass over
// its token rows) and runs its pairs of it.
bool attention_qkv(const AttentionArgs& a, const Parallel& parallel) {
  if (a.heads <= 0 || a.head_dim <= 0 || a.tokens < 0) return false;
  return dispatch_dtype<CpuTypes>(a.dtype, [&](auto scalar_tag) {
    using scalar_t = typename decltype(scalar_tag)::type;
    using acc_t = acc_type<scalar_t>;
    const int64_t H = a.heads, pairs = a.batch * H;
    if (pairs == 0 || a.tokens == 0) return true;
    const int64_t work = a.tokens * a.tokens * a.head_dim;
    const int64_t bytes = attn_round_up(
        AttnScratch<acc_t>::values(a.tokens, H, a.head_dim) * (int64_t)sizeof(acc_t), kAttnAlign);
    int ok = 1;
    parallel_for(parallel, pairs, work >= kGrain ? 1 : kGrain / work, [&](int64_t begin, int64_t end) {
      void* mem = nullptr;
      if (posix_memalign(&mem, kAttnAlign, (size_t)bytes) != 0) {
        __atomic_store_n(&ok, 0, __ATOMIC_RELAXED);
        return;
      }
      AttnScratch<acc_t> w(static_cast<acc_t*>(mem), a.tokens, H, a.head_dim);
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / H;
        if (bh == begin || bh % H == 0) attn_load_sequence<scalar_t, acc_t>(a, b, w);
        attn_head<scalar_t, acc_t>(a, b, bh % H, w);
      }
      free(mem);
    });
    return ok != 0;
  });
}

// Constant-initialized (no code runs at load time).
constexpr Kernels kKernels{DIFFCORE_CPU_ISA_NAME, q_sample, ddim_step, ddpm_step, hybrid_loss_forward,
                           hybrid_loss_backward, group_norm_act, attention_qkv};

}  // namespace

const Kernels& kernels() { return kKernels; }

}  // namespace DIFFCORE_CPU_ISA_NS
}  // namespace cpu
}  // namespace diffcore
