// fast_math.h: exp, log, sin/cos, max/min/clamp for the fused kernels, host-device and torch-free. The float
// versions are written with plain arithmetic so that CPU loops using them vectorize; NaN and infinities behave as
// in torch. Included by formulas.h and philox.h (the umbrella is diffcore_math.h).
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "dispatch.h"

#if defined(__AVX512F__) && !defined(__CUDACC__)
#include <immintrin.h>
#endif

namespace diffcore {
DC_ISA_BEGIN

// exp in float by Cody-Waite range reduction and Cephes' degree-6 polynomial (about 1 ulp), written with plain
// arithmetic so that CPU loops using it vectorize. Like torch.exp: NaN propagates, exp(x) = inf above
// ln(FLT_MAX) = 88.72, denormals below e^-87.3 and 0 below e^-103.97 (exp(-inf) = 0). 2^n is applied as two
// factors 2^(n/2) 2^(n - n/2), each a normal float for n in [-150, 128], so the scaling is exact (one rounding
// where the result is denormal).
DC_HD float dc_int_as_float(int32_t i) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(i);
#else
  float f;
  memcpy(&f, &i, sizeof(f));
  return f;
#endif
}

DC_HD int32_t dc_float_as_int(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(f);
#else
  int32_t i;
  memcpy(&i, &f, sizeof(i));
  return i;
#endif
}

// a * b + c with one rounding where the instruction set has fused multiply-add (CUDA; the AVX2 and AVX-512 CPU
// kernel variants, built with -march=x86-64-v3 / v4, where __FMA__ is defined), a * b + c with two roundings
// elsewhere (the baseline variant: fmaf would be a library call there). The build's -ffp-contract=off leaves
// plain a * b + c alone, so this is the only place the CPU kernels fuse.
DC_HD float dc_fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return fmaf(a, b, c);
#elif defined(__FMA__) || defined(__ARM_FEATURE_FMA)
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}
DC_HD double dc_fma(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return fma(a, b, c);
#elif defined(__FMA__) || defined(__ARM_FEATURE_FMA)
  return __builtin_fma(a, b, c);
#else
  return a * b + c;
#endif
}

// exp(xc) = p 2^n for xc in [-103.97, 88.72]: reduction to r = xc - n ln2, |r| <= ln2 / 2, and a polynomial
// p = exp(r) = 1 + r + r^2 P(r) of degree kDegree. Shared by dc_exp and dc_silu. n is read from the bits of
// xc log2(e) + 1.5 * 2^23 (no float-to-int conversion). Relative error of p 2^n against float64, measured over
// [-100, 100] in every CPU variant (the baseline's, without fused multiply-add, in brackets):
//   6: Cody-Waite reduction (ln2 in two parts), Cephes' polynomial: 8.3e-8 (8.0e-8), about 1 ulp (dc_exp).
//   5: the same reduction, a near-minimax fit of the relative error (1.1e-7 on its own): about 2 ulp.
//   4: one-step reduction, a near-minimax fit (5.3e-6 on its own): 5.6e-6 (9.4e-6), for results stored in
//      bfloat16 / float16 (which round to 2^-9 / 2^-12 relative).
struct ExpParts {
  float p;
  int32_t n;
};

// Broadcast of a float constant to the value type V of a formula written once for scalars and vectors (the
// AVX-512 kernel variant instantiates some with __m512, see below).
DC_HD float dc_splat(float c, float) { return c; }

#if defined(__AVX512F__) && !defined(__CUDACC__)
// Only in the CPU kernels' AVX-512 variant (compiled with -march=x86-64-v4): the __m512 overloads that let the
// templates below run on 16 floats at once (GCC's vector operators do +, -, *).
inline __m512 dc_splat(float c, __m512) { return _mm512_set1_ps(c); }
inline __m512 dc_fma(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
#endif

// The polynomial part of exp(xc) = p 2^n for V = float (or a vector of floats): returns p and sets *k to
// xc log2(e) + 1.5 * 2^23, so that n = k - 1.5 * 2^23 and the bits of k are those of 1.5 * 2^23, plus n.
template <int kDegree, typename V>
DC_HD V dc_exp_poly(V xc, V* k_out) {
  static_assert(kDegree >= 4 && kDegree <= 6, "degree 4, 5 or 6");
  const V magic = dc_splat(12582912.0f, xc);  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  const V k = dc_fma(xc, dc_splat(1.44269504088896341f, xc), magic);
  const V n = k - magic;
  V r, p;
  if (kDegree == 4) {
    r = dc_fma(n, dc_splat(-0.693147182f, xc), xc);
    p = dc_splat(4.1277747602e-2f, xc);
    p = dc_fma(p, r, dc_splat(1.6753514111e-1f, xc));
    p = dc_fma(p, r, dc_splat(5.0005114079e-1f, xc));
  } else if (kDegree == 5) {
    r = dc_fma(n, dc_splat(2.12194440e-4f, xc), dc_fma(n, dc_splat(-0.693359375f, xc), xc));
    p = dc_splat(8.3125252277e-3f, xc);
    p = dc_fma(p, r, dc_splat(4.1890114546e-2f, xc));
    p = dc_fma(p, r, dc_splat(1.6667114198e-1f, xc));
    p = dc_fma(p, r, dc_splat(4.9999231100e-1f, xc));
  } else {
    r = dc_fma(n, dc_splat(2.12194440e-4f, xc), dc_fma(n, dc_splat(-0.693359375f, xc), xc));
    p = dc_splat(1.9875691500e-4f, xc);
    p = dc_fma(p, r, dc_splat(1.3981999507e-3f, xc));
    p = dc_fma(p, r, dc_splat(8.3334519073e-3f, xc));
    p = dc_fma(p, r, dc_splat(4.1665795894e-2f, xc));
    p = dc_fma(p, r, dc_splat(1.6666665459e-1f, xc));
    p = dc_fma(p, r, dc_splat(5.0000001201e-1f, xc));
  }
  *k_out = k;
  return dc_fma(p, r * r, r) + dc_splat(1.0f, xc);
}

template <int kDegree = 6>
DC_HD ExpParts dc_exp_parts(float xc) {
  float k;
  const float p = dc_exp_poly<kDegree>(xc, &k);
  return ExpParts{p, dc_float_as_int(k) - 0x4b400000};  // the bits of magic + n are those of magic, plus n
}

DC_HD float dc_exp(float x) {
  const float xc = x < -103.972084f ? -103.972084f : (x > 88.7228394f ? 88.7228394f : x);
  const ExpParts e = dc_exp_parts(xc);
  const int32_t n1 = e.n / 2, n2 = e.n - n1;
  float result = (e.p * dc_int_as_float((n1 + 127) << 23)) * dc_int_as_float((n2 + 127) << 23);
  result = x < -103.972084f ? 0.0f : result;
  result = x > 88.7228394f ? INFINITY : result;
  return x != x ? x : result;
}
DC_HD double dc_exp(double x) { return exp(x); }

// silu(y) = y sigmoid(y) = y / (1 + exp(-y)), computed from e = exp(-|y|) in (0, 1] so that nothing overflows:
// y / (1 + e) for y >= 0, y e / (1 + e) for y < 0. exp(-|y|) is taken as 0 below e^-87.33 (about the smallest
// normal float), where |silu(y)| < 1e-36; above, p 2^n is normal (n >= -126 with p >= 1 there), so 2^n is applied
// by adding n to p's exponent bits. NaN propagates (through y). kStore16: results stored in bfloat16 / float16,
// exp of degree 4, else of degree 5 (dc_exp_parts). Relative error against float64 (tests/test_group_norm_act.py):
// float32, 3.3e-7 over every float in [-30, 30] (about 3 ulp; torch's F.silu 1.7e-7); 16-bit, 9.4e-6 before
// the rounding to 16 bits (5.6e-6 with fused multiply-add).
template <bool kStore16 = false>
DC_HD float dc_silu(float y) {
  const float t = y < 0.0f ? y : -y;  // -|y|
  const ExpParts parts = dc_exp_parts<kStore16 ? 4 : 5>(t < -87.33f ? -87.33f : t);
  const float e = t < -87.33f ? 0.0f : dc_int_as_float(dc_float_as_int(parts.p) + (int32_t)((uint32_t)parts.n << 23));
  return (y < 0.0f ? y * e : y) / (1.0f + e);
}
template <bool kStore16 = false>
DC_HD double dc_silu(double y) { return y / (1.0 + exp(-y)); }

// log in float: exponent from the bits, Cephes' polynomial on the mantissa in [sqrt(1/2), sqrt(2)) (about 1 ulp);
// plain arithmetic so that loops vectorize. log(0) = -inf, log(x < 0) = NaN, log(inf) = inf, NaN propagates.
DC_HD float dc_log(float x) {
  const bool denormal = x < 1.17549435e-38f;
  const float xs = denormal ? x * 8388608.0f : x;  // 2^23
  const int32_t bits = dc_float_as_int(xs);
  int32_t e = ((bits >> 23) & 0xff) - 127 - (denormal ? 23 : 0);
  float m = dc_int_as_float((bits & 0x007fffff) | 0x3f800000);  // [1, 2)
  const bool high = m > 1.41421356f;
  m = high ? m * 0.5f : m;
  e = high ? e + 1 : e;
  const float f = m - 1.0f, z = f * f, fe = (float)e;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y = y + -2.12194440e-4f * fe;
  y = y - 0.5f * z;
  float result = (f + y) + 0.693359375f * fe;
  result = x == 0.0f ? -INFINITY : result;
  result = x > 3.40282347e+38f ? x : result;  // inf
  return (x < 0.0f || x != x) ? NAN : result;
}
DC_HD double dc_log(double x) { return log(x); }
DC_HD float dc_sqrt(float x) { return sqrtf(x); }
DC_HD double dc_sqrt(double x) { return sqrt(x); }
DC_HD float dc_tanh(float x) { return tanhf(x); }
DC_HD double dc_tanh(double x) { return tanh(x); }
// max / min / clamp with torch's NaN semantics (torch.maximum, torch.minimum, torch.clamp): a NaN operand gives
// NaN. A comparison with NaN is false, so the NaN is selected explicitly (x != x); still branch-free selects.
template <typename T> DC_HD bool dc_isnan(T x) { return x != x; }
template <typename T> DC_HD T dc_max(T a, T b) { return (a > b || dc_isnan(a)) ? a : b; }
template <typename T> DC_HD T dc_min(T a, T b) { return (a < b || dc_isnan(a)) ? a : b; }
template <typename T> DC_HD T dc_clamp(T x, T lo, T hi) { return dc_min(dc_max(x, lo), hi); }
// sin and cos in float for x in [0, 2 pi] (the Box-Muller angle): Cody-Waite reduction by pi/2 and Cephes'
// polynomials on [-pi/4, pi/4] (about 1-2 ulp); plain arithmetic so that loops vectorize.
DC_HD void dc_sincos(float x, float* s, float* c) {
  const float magic = 12582912.0f;
  const float n = (x * 0.636619772367581f + magic) - magic;  // nearest multiple of pi/2
  const float r = ((x - n * 1.5703125f) - n * 4.837512969970703125e-4f) - n * 7.54978995489188216e-8f;
  const float r2 = r * r;
  const float sin_r = r + r * r2 * (-1.6666654611e-1f + r2 * (8.3321608736e-3f + r2 * -1.9515295891e-4f));
  const float cos_r = 1.0f - 0.5f * r2 + r2 * r2 * (4.166664568298827e-2f + r2 * (-1.388731625493765e-3f +
                                                                                   r2 * 2.443315711809948e-5f));
  const int32_t q = (int32_t)n & 3;
  const float sv = (q & 1) ? cos_r : sin_r;
  const float cv = (q & 1) ? sin_r : cos_r;
  *s = (q & 2) ? -sv : sv;
  *c = ((q + 1) & 2) ? -cv : cv;
}
DC_HD void dc_sincos(double x, double* s, double* c) { *s = sin(x); *c = cos(x); }

DC_ISA_END
}  // namespace diffcore
