// formulas.h: the one C++ copy of every formula of the fused ops (DESIGN.md section 3), as host-device inline
// functions; the twin of diffcore/reference/formulas.py and diffcore/reference/ops.py.
//
// Conventions (improved-diffusion): t in {0..T-1}, abar = alphas_cumprod[t], abar_prev = alphas_cumprod[t-1]
// (1 at t = 0), beta = 1 - abar / abar_prev. Per-sample coefficients are computed in double from the float64
// table and cast to the compute type acc_t (float, or double for float64 inputs); the elementwise math runs in
// acc_t. Torch-free, so that nvcc can compile it on a machine whose torch is a CPU build.
#pragma once

#include <math.h>
#include <stdint.h>

#include "fast_math.h"
#include "kernel_args.h"

namespace diffcore {
DC_ISA_BEGIN

constexpr double kLn2 = 0.69314718055994530942;

// ---- schedule quantities at one timestep (double) ----
DC_HD double abar_prev_at(const double* abar, int64_t t) { return t > 0 ? abar[t - 1] : 1.0; }

// beta~_t = beta_t (1 - abar_prev) / (1 - abar_t)
DC_HD double posterior_variance_at(const double* abar, int64_t t) {
  const double ab = abar[t], ab_prev = abar_prev_at(abar, t);
  const double beta = 1.0 - ab / ab_prev;
  return beta * (1.0 - ab_prev) / (1.0 - ab);
}

struct StepTables {
  double abar, abar_prev, beta;
  double log_post_var_clipped;  // log beta~_t, entry 0 replaced by entry 1
  double log_beta_large;        // log beta_t, entry 0 replaced by log beta~_1 (fixed_large)
};

// Needs T >= 2 for the clipped entries at t = 0.
DC_HD StepTables gather_tables(const double* abar, int64_t t) {
  StepTables s;
  s.abar = abar[t];
  s.abar_prev = abar_prev_at(abar, t);
  s.beta = 1.0 - s.abar / s.abar_prev;
  const double var1 = posterior_variance_at(abar, 1);
  s.log_post_var_clipped = log(t == 0 ? var1 : posterior_variance_at(abar, t));
  s.log_beta_large = log(t == 0 ? var1 : s.beta);
  return s;
}

// ---- model prediction -> (x0_hat, eps_hat) ----
template <typename acc_t>
struct PredictCoeffs {
  acc_t sqrt_recip_abar, sqrt_recipm1_abar, sqrt_abar, sqrt_one_minus_abar;
};

template <typename acc_t>
DC_HD PredictCoeffs<acc_t> make_predict_coeffs(double abar) {
  PredictCoeffs<acc_t> c;
  c.sqrt_recip_abar = (acc_t)sqrt(1.0 / abar);
  c.sqrt_recipm1_abar = (acc_t)sqrt(1.0 / abar - 1.0);
  c.sqrt_abar = (acc_t)sqrt(abar);
  c.sqrt_one_minus_abar = (acc_t)sqrt(1.0 - abar);
  return c;
}

// x0 = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps; eps = (sqrt(1/abar) x_t - x0) / sqrt(1/abar - 1);
// v-prediction: x0 = sqrt(abar) x_t - sqrt(1 - abar) v, eps = sqrt(abar) v + sqrt(1 - abar) x_t.
// With clip, x0 is clamped to [-1, 1] and eps re-derived from it.
template <typename acc_t>
DC_HD void predict_x0_eps(int prediction_type, bool clip, const PredictCoeffs<acc_t>& c, acc_t x, acc_t pred,
                          acc_t& x0, acc_t& eps) {
  if (prediction_type == kPredEps) {
    x0 = c.sqrt_recip_abar * x - c.sqrt_recipm1_abar * pred;
    eps = pred;
  } else if (prediction_type == kPredX0) {
    x0 = pred;
    eps = (c.sqrt_recip_abar * x - x0) / c.sqrt_recipm1_abar;
  } else {
    x0 = c.sqrt_abar * x - c.sqrt_one_minus_abar * pred;
    eps = c.sqrt_abar * pred + c.sqrt_one_minus_abar * x;
  }
  if (clip) {
    x0 = dc_clamp(x0, (acc_t)-1, (acc_t)1);
    eps = (c.sqrt_recip_abar * x - x0) / c.sqrt_recipm1_abar;
  }
}

// The regression target of the prediction: noise, x0, or v = sqrt(abar) eps - sqrt(1 - abar) x0.
template <typename acc_t>
DC_HD acc_t training_target(int prediction_type, const PredictCoeffs<acc_t>& c, acc_t x0, acc_t noise) {
  if (prediction_type == kPredEps) return noise;
  if (prediction_type == kPredX0) return x0;
  return c.sqrt_abar * noise - c.sqrt_one_minus_abar * x0;
}

// ---- q_sample: x_t = sqrt(abar) x0 + sqrt(1 - abar) noise ----
template <typename acc_t>
DC_HD acc_t q_sample_value(const PredictCoeffs<acc_t>& c, acc_t x0, acc_t noise) {
  return c.sqrt_abar * x0 + c.sqrt_one_minus_abar * noise;
}

// ---- DDIM (Song et al. 2021, eq. 12) ----
template <typename acc_t>
struct DdimCoeffs {
  PredictCoeffs<acc_t> predict;
  acc_t c_x0, c_eps, sigma;
};

// t_prev < 0: final step (abar_s = 1). t_prev > t: reverse (inversion) step, sigma = 0.
// sigma = eta sqrt((1 - abar_s)/(1 - abar_t)) sqrt(1 - abar_t/abar_s); c_eps = sqrt(1 - abar_s - sigma^2).
template <typename acc_t>
DC_HD DdimCoeffs<acc_t> make_ddim_coeffs(const double* abar, int64_t t, int64_t t_prev, double eta) {
  const double ab = abar[t];
  const double ab_s = t_prev >= 0 ? abar[t_prev] : 1.0;
  double sigma = 0.0;
  if (t_prev < t && eta != 0.0) {
    sigma = eta * sqrt((1.0 - ab_s) / (1.0 - ab)) * sqrt(dc_max(1.0 - ab / ab_s, 0.0));
  }
  DdimCoeffs<acc_t> c;
  c.predict = make_predict_coeffs<acc_t>(ab);
  c.c_x0 = (acc_t)sqrt(ab_s);
  c.c_eps = (acc_t)sqrt(dc_max(1.0 - ab_s - sigma * sigma, 0.0));
  c.sigma = (acc_t)sigma;
  return c;
}

// Whether a sample of a DDIM step reads noise. The reference adds sigma z to every sample when eta != 0, so a given
// noise tensor is read then even where sigma is 0 (0 * NaN = NaN, as in torch); Philox noise is always finite, so
// it is drawn only where sigma != 0 (NaN included). Where no noise is read, z = 0.
template <typename acc_t>
DC_HD bool ddim_takes_noise(bool noise_given, double eta, acc_t sigma) {
  return noise_given ? eta != 0.0 : sigma != (acc_t)0;
}

// x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z. Returns x_s; writes x0_hat.
template <typename acc_t>
DC_HD acc_t ddim_value(int prediction_type, bool clip, const DdimCoeffs<acc_t>& c, acc_t x, acc_t pred, acc_t z,
                       acc_t& x0) {
  acc_t eps;
  predict_x0_eps(prediction_type, clip, c.predict, x, pred, x0, eps);
  return c.c_x0 * x0 + c.c_eps * eps + c.sigma * z;
}

// ---- posterior q(x_{t-1} | x_t, x0) and model variances ----
template <typename acc_t>
struct PosteriorCoeffs {
  PredictCoeffs<acc_t> predict;
  acc_t coef1, coef2;      // mu~ = coef1 x0 + coef2 x_t
  acc_t post_log_var;      // log beta~ (clipped)
  acc_t fixed_log_var;     // the model's log variance for the fixed types
  acc_t fixed_std;         // exp(0.5 fixed_log_var), once per sample
  acc_t max_log;           // log beta_t (learned_range upper end)
  bool nonzero_t;          // t > 0
  acc_t nonzero;           // 1 if t > 0 else 0
};

template <typename acc_t>
DC_HD PosteriorCoeffs<acc_t> make_posterior_coeffs(const double* abar, int64_t t, int variance_type) {
  const StepTables s = gather_tables(abar, t);
  PosteriorCoeffs<acc_t> c;
  c.predict = make_predict_coeffs<acc_t>(s.abar);
  c.coef1 = (acc_t)(s.beta * sqrt(s.abar_prev) / (1.0 - s.abar));
  c.coef2 = (acc_t)((1.0 - s.abar_prev) * sqrt(1.0 - s.beta) / (1.0 - s.abar));
  c.post_log_var = (acc_t)s.log_post_var_clipped;
  const double fixed_log_var = variance_type == kFixedLarge ? s.log_beta_large : s.log_post_var_clipped;
  c.fixed_log_var = (acc_t)fixed_log_var;
  c.fixed_std = (acc_t)exp(0.5 * fixed_log_var);
  c.max_log = (acc_t)log(s.beta);
  c.nonzero_t = t > 0;
  c.nonzero = c.nonzero_t ? (acc_t)1 : (acc_t)0;
  return c;
}

// log sigma^2 of p(x_{t-1} | x_t): fixed, learned_range (frac log beta + (1 - frac) log beta~, frac = (v+1)/2)
// or learned (v itself).
template <typename acc_t>
DC_HD acc_t model_log_variance(int variance_type, const PosteriorCoeffs<acc_t>& c, acc_t v) {
  if (variance_type == kLearnedRange) {
    const acc_t frac = (v + (acc_t)1) / (acc_t)2;
    return frac * c.max_log + ((acc_t)1 - frac) * c.post_log_var;
  }
  if (variance_type == kLearned) return v;
  return c.fixed_log_var;
}

// The gradient with respect to v of the model log variance, given the gradient g with respect to the log variance,
// in the order torch's autograd computes it for the reference (frac max + (1 - frac) min: g max - g min, then
// d frac / dv = 1/2), so that an infinite g gives NaN (inf - inf) where the reference does.
template <typename acc_t>
DC_HD acc_t model_log_variance_backward(int variance_type, const PosteriorCoeffs<acc_t>& c, acc_t g) {
  return variance_type == kLearnedRange ? (g * c.max_log - g * c.post_log_var) / (acc_t)2 : g;
}

// Whether a sample of a DDPM step reads noise: the reference computes [t > 0] sigma z for every sample, so a given
// noise tensor is always read (a non-finite z at t = 0 gives NaN, as in torch); Philox noise only where t > 0.
DC_HD bool ddpm_takes_noise(bool noise_given, bool nonzero_t) { return noise_given || nonzero_t; }

// One ancestral step: x_{t-1} = mu~(x0_hat, x_t) + [t > 0] exp(0.5 log sigma^2) z. Returns x_{t-1}; writes x0_hat.
template <typename acc_t>
DC_HD acc_t ddpm_value(int prediction_type, int variance_type, bool clip, const PosteriorCoeffs<acc_t>& c, acc_t x,
                       acc_t pred, acc_t v, acc_t z, acc_t& x0) {
  acc_t eps;
  predict_x0_eps(prediction_type, clip, c.predict, x, pred, x0, eps);
  const acc_t mean = c.coef1 * x0 + c.coef2 * x;
  // branch-free in the element (so loops vectorize): [t > 0] multiplies the noise term, as in the reference
  const acc_t std = (variance_type == kFixedSmall || variance_type == kFixedLarge)
                        ? c.fixed_std
                        : dc_exp((acc_t)0.5 * model_log_variance(variance_type, c, v));
  return mean + c.nonzero * std * z;
}

// ---- the hybrid loss terms ----
// KL(N(m1, e^lv1) || N(m2, e^lv2)) in nats.
template <typename acc_t>
DC_HD acc_t normal_kl(acc_t m1, acc_t lv1, acc_t m2, acc_t lv2) {
  const acc_t d = m1 - m2;
  return (acc_t)0.5 * ((acc_t)-1 + lv2 - lv1 + dc_exp(lv1 - lv2) + d * d * dc_exp(-lv2));
}

// d KL / d lv2
template <typename acc_t>
DC_HD acc_t normal_kl_grad_lv2(acc_t m1, acc_t lv1, acc_t m2, acc_t lv2) {
  const acc_t d = m1 - m2;
  return (acc_t)0.5 * ((acc_t)1 - dc_exp(lv1 - lv2) - d * d * dc_exp(-lv2));
}

// Approximate standard normal CDF 0.5 (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3))) and its derivative.
template <typename acc_t>
DC_HD acc_t approx_cdf(acc_t u) {
  const acc_t k = (acc_t)0.7978845608028654;
  return (acc_t)0.5 * ((acc_t)1 + dc_tanh(k * (u + (acc_t)0.044715 * u * u * u)));
}

template <typename acc_t>
DC_HD acc_t approx_pdf(acc_t u) {
  const acc_t k = (acc_t)0.7978845608028654;
  const acc_t th = dc_tanh(k * (u + (acc_t)0.044715 * u * u * u));
  // In the order of the reference's backward (tanh, then k, then u + 0.044715 u.pow(3) whose derivative is
  // 3 u^2): 3 u^2 overflows to inf where it does there, and a saturated tanh (1 - th^2 = 0) times inf is NaN in both.
  const acc_t g = (acc_t)0.5 * ((acc_t)1 - th * th) * k;
  return g + (g * (acc_t)0.044715) * ((acc_t)3 * (u * u));
}

// d log(clamp(v, min = tiny)) / dv as torch's autograd computes it: 1 / v where v >= tiny, else 0 (clamp's backward
// masks the gradient, also at NaN). Callers multiply it by the inner derivative, so a NaN there still gives NaN,
// as in the chain rule of the reference.
template <typename acc_t>
DC_HD acc_t log_clamped_grad(acc_t v, acc_t tiny) {
  return v >= tiny ? (acc_t)1 / v : (acc_t)0;
}

// log p(x) of x in [-1, 1] under N(mean, e^{2 log_scale}) discretized into 256 bins of width 2/255 (edge bins
// open), logs clamped at 1e-12 (NaN propagates through the clamp, as torch.clamp does); and d log p / d log_scale
// (mean held fixed). A NaN x takes the inner-bin formula, like the reference's torch.where.
template <typename acc_t>
DC_HD acc_t discretized_log_likelihood(acc_t x, acc_t mean, acc_t log_scale, acc_t* grad_log_scale) {
  const acc_t centered = x - mean;
  const acc_t inv_stdv = dc_exp(-log_scale);
  const acc_t half_bin = (acc_t)(1.0 / 255.0);
  const acc_t plus_in = inv_stdv * (centered + half_bin);
  const acc_t min_in = inv_stdv * (centered - half_bin);
  const acc_t tiny = (acc_t)1e-12;
  // d plus_in / d log_scale = -plus_in (likewise for min_in)
  if (x < (acc_t)-0.999) {
    const acc_t cdf_plus = approx_cdf(plus_in);
    if (grad_log_scale) *grad_log_scale = log_clamped_grad(cdf_plus, tiny) * (-approx_pdf(plus_in) * plus_in);
    return dc_log(dc_max(cdf_plus, tiny));
  }
  if (x > (acc_t)0.999) {
    const acc_t one_minus = (acc_t)1 - approx_cdf(min_in);
    if (grad_log_scale) *grad_log_scale = log_clamped_grad(one_minus, tiny) * (approx_pdf(min_in) * min_in);
    return dc_log(dc_max(one_minus, tiny));
  }
  const acc_t delta = approx_cdf(plus_in) - approx_cdf(min_in);
  if (grad_log_scale) {
    *grad_log_scale =
        log_clamped_grad(delta, tiny) * (approx_pdf(min_in) * min_in - approx_pdf(plus_in) * plus_in);
  }
  return dc_log(dc_max(delta, tiny));
}

template <typename acc_t>
struct HybridTerms {
  acc_t sq_err;   // (prediction - target)^2
  acc_t vb_bits;  // KL (t > 0) or decoder NLL (t = 0), in bits
  acc_t d_sq_err_d_pred;
  acc_t d_vb_d_v;
};

// Per-element terms of the hybrid loss and their derivatives. The model mean uses x0_hat from the prediction,
// which the loss treats as a constant (stop-gradient): vb depends on the variance output v only.
template <typename acc_t>
DC_HD HybridTerms<acc_t> hybrid_terms(int prediction_type, int variance_type, const PosteriorCoeffs<acc_t>& c,
                                      acc_t pred, acc_t v, acc_t x0, acc_t x_t, acc_t noise, bool want_grad) {
  HybridTerms<acc_t> r;
  const acc_t err = pred - training_target(prediction_type, c.predict, x0, noise);
  r.sq_err = err * err;
  r.d_sq_err_d_pred = (acc_t)2 * err;
  acc_t x0_hat, eps_hat;
  predict_x0_eps(prediction_type, false, c.predict, x_t, pred, x0_hat, eps_hat);
  const acc_t model_mean = c.coef1 * x0_hat + c.coef2 * x_t;
  const acc_t model_lv = model_log_variance(variance_type, c, v);
  const acc_t inv_ln2 = (acc_t)(1.0 / kLn2);
  acc_t d_vb_d_lv;
  if (c.nonzero_t) {
    const acc_t true_mean = c.coef1 * x0 + c.coef2 * x_t;
    r.vb_bits = normal_kl(true_mean, c.post_log_var, model_mean, model_lv) * inv_ln2;
    d_vb_d_lv = want_grad ? normal_kl_grad_lv2(true_mean, c.post_log_var, model_mean, model_lv) * inv_ln2 : (acc_t)0;
  } else {
    acc_t d_ll_d_scale = 0;
    r.vb_bits = -discretized_log_likelihood(x0, model_mean, (acc_t)0.5 * model_lv,
                                            want_grad ? &d_ll_d_scale : (acc_t*)0) * inv_ln2;
    d_vb_d_lv = -(acc_t)0.5 * d_ll_d_scale * inv_ln2;
  }
  r.d_vb_d_v = model_log_variance_backward(variance_type, c, d_vb_d_lv);
  return r;
}

// ---- group_norm_act (diffcore/reference/group_norm.py) ----
//
// Statistics: a kernel sums (x - pivot) and (x - pivot)^2 over a run of n values of one group, the pivot being
// one of those values (so that |mean| >> std costs no precision), turns the sums into (count, mean, M2) and
// merges runs by Chan et al.'s pairwise update, in double. The elementwise pass subtracts the same pivot first:
// x - pivot is exact when x is within a factor 2 of it (Sterbenz), so a large common offset is removed without
// rounding and the mean is only needed relative to the pivot.
struct Moments {
  double n, mean, m2;  // count, mean and sum of squared deviations from the mean
};

DC_HD Moments moments_from_shifted_sums(double n, double pivot, double sum, double sum_sq) {
  Moments m;
  m.n = n;
  m.mean = pivot + sum / n;
  m.m2 = sum_sq - sum * (sum / n);
  return m;
}

DC_HD Moments merge_moments(const Moments& a, const Moments& b) {
  if (a.n == 0.0) return b;
  if (b.n == 0.0) return a;
  Moments m;
  m.n = a.n + b.n;
  const double delta = b.mean - a.mean;
  m.mean = a.mean + delta * (b.n / m.n);
  m.m2 = a.m2 + b.m2 + delta * delta * (a.n * b.n / m.n);
  return m;
}

struct GroupStats {
  double mean, rstd;  // rstd = 1 / sqrt(biased variance + eps); NaN in the group's values propagates to both
};

DC_HD GroupStats group_stats(const Moments& m, double eps) {
  GroupStats s;
  s.mean = m.mean;
  s.rstd = 1.0 / sqrt(dc_max(m.m2 / m.n, 0.0) + eps);
  return s;
}

// What the elementwise pass needs for channel c of image b: y = (x - pivot) a + d, then SiLU, with
// a = rstd w_c (1 + scale_bc) (rounded to acc_t) and d = b_c (1 + scale_bc) + shift_bc - (mean - pivot) a, the mean
// folded into d in double (when absent: w = 1, b = 0, scale = 0, shift = 0). x - pivot stays exact near a large
// common offset (the pivot is one of the group's values); d's rounding is relative to |b (1 + s) + shift| and
// |mean - pivot| a, about the size of the normalized values.
template <typename acc_t>
struct GroupNormCoeffs {
  acc_t pivot, a, d;
};

template <typename acc_t>
DC_HD GroupNormCoeffs<acc_t> group_norm_coeffs(const GroupStats& s, acc_t pivot, acc_t weight, acc_t bias,
                                               acc_t scale, acc_t shift) {
  GroupNormCoeffs<acc_t> c;
  const acc_t factor = (acc_t)1 + scale;
  c.pivot = pivot;
  c.a = (acc_t)s.rstd * weight * factor;
  c.d = (acc_t)((double)(bias * factor + shift) - (s.mean - (double)pivot) * (double)c.a);
  return c;
}

// kStore16: the result is stored in 16 bits (bfloat16 / float16), so the SiLU may take the short exp (dc_silu).
template <typename acc_t, bool kStore16 = false>
DC_HD acc_t group_norm_act_value(bool apply_silu, acc_t pivot, acc_t a, acc_t d, acc_t x) {
  const acc_t y = dc_fma(x - pivot, a, d);
  return apply_silu ? dc_silu<kStore16>(y) : y;
}

// ---- attention_qkv (diffcore/reference/attention.py) ----
//
// Per query row i of one (sequence, head): s_j = (q_i . k_j) * scale with scale = 1 / sqrt(d), m = max_j s_j
// (NaN propagates), e_j = exp(s_j - m), out = (sum_j e_j v_j) / (sum_j e_j). The CUDA kernel accumulates the dot
// products and weighted sums by attention_fma (fused multiply-add); the CPU kernels by a multiply and an add on
// vector types (the build keeps contraction off), in the same float32 (float64) arithmetic.
template <typename acc_t>
DC_HD acc_t attention_scale(int64_t head_dim) {
  return (acc_t)(1.0 / sqrt((double)head_dim));
}

DC_HD float attention_fma(float a, float b, float c) { return dc_fma(a, b, c); }
DC_HD double attention_fma(double a, double b, double c) { return a * b + c; }

// e_j = exp(s_j - m): in (0, 1] for s_j <= m, 0 for s_j = -inf (a masked or padded key), NaN when either is NaN.
// float: x = s_j - m <= 0, so exp(x) is taken as 0 below e^-87.33 (the smallest normal float: weights that small
// change no sum of weights >= 1), and above, p 2^n with the degree-5 polynomial of dc_exp_parts (about 2 ulp) and
// 2^n added to p's exponent bits, as dc_silu does. double: exp.
DC_HD float softmax_term(float score, float row_max) {
  const float x = score - row_max;
  const ExpParts e = dc_exp_parts<5>(x < -87.33f ? -87.33f : x);
  const float value = dc_int_as_float(dc_float_as_int(e.p) + (int32_t)((uint32_t)e.n << 23));
  return x != x ? x : (x < -87.33f ? 0.0f : value);
}
DC_HD double softmax_term(double score, double row_max) { return exp(score - row_max); }

// The output channel from its weighted sum and the row's 1 / sum_j e_j.
template <typename acc_t>
DC_HD acc_t softmax_output(acc_t weighted_sum, acc_t inv_total) {
  return weighted_sum * inv_total;
}

DC_ISA_END
}  // namespace diffcore
