// dispatch.h: what the CPU kernels (csrc/cpu/kernels_cpu.cpp) and the CUDA kernels (csrc/cuda/kernel_ops.cuh) share
// besides the math: the host-device macro, type tags, the dtype / enum / bool dispatchers and the row access of
// kernel_args.h. Torch-free, so that nvcc compiles it on a machine whose torch is a CPU build.
//
// Dispatchers turn a run-time switch into a template constant and call f with it; f returns a result type R (void
// is not allowed). A value outside the switch's enum is never mapped to a default: the dispatcher returns
// DispatchFailure<R>::value() instead, which each backend turns into an error (bool: false, checked by the CPU
// kernels; cudaError_t: cudaErrorInvalidValue, specialised in kernel_ops.cuh).
#pragma once

#include <stdint.h>

#include <type_traits>

#include "kernel_args.h"

#if defined(__CUDACC__)
#define DC_HD __host__ __device__ __forceinline__
#define DC_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define DC_HD inline __attribute__((always_inline))
#define DC_UNROLL
#else
#define DC_HD inline
#define DC_UNROLL
#endif

// The CPU kernel file is compiled once per instruction set (setup.py defines DIFFCORE_CPU_ISA_NS = isa_baseline,
// isa_avx2, isa_avx512, isa_avx512_bf16). The inline functions of these headers then live in an inline namespace of
// that name, so each variant's copies get their own symbol names and the linker can never substitute an AVX-512 copy
// of a shared inline function for the baseline one (the one-definition-rule trap of per-file instruction-set
// flags). Elsewhere (CUDA, the bindings) the namespace is absent.
#if defined(DIFFCORE_CPU_ISA_NS)
#define DC_ISA_BEGIN inline namespace DIFFCORE_CPU_ISA_NS {
#define DC_ISA_END }
#else
#define DC_ISA_BEGIN
#define DC_ISA_END
#endif

namespace diffcore {
DC_ISA_BEGIN

// ---- type tags ----

template <typename T>
struct Tag {
  using type = T;
};

template <int V>
using Int = std::integral_constant<int, V>;

// The compute type of a storage type: float for float / half / bfloat16, double for double.
template <typename scalar_t>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename scalar_t>
using acc_type = typename AccOf<scalar_t>::type;

// ---- dispatchers ----

template <typename R>
struct DispatchFailure;  // value(): what a dispatcher returns for a value outside the enum

template <>
struct DispatchFailure<bool> {
  static constexpr bool value() { return false; }
};

// The storage types of the 16-bit dtypes differ between backends (c10::Half / __half, ...): Types provides
// `half` and `bfloat16`. Calls f(Tag<scalar_t>{}).
template <typename Types, typename F>
auto dispatch_dtype(DType dtype, F&& f) -> decltype(f(Tag<float>{})) {
  using R = decltype(f(Tag<float>{}));
  switch (dtype) {
    case DType::kFloat32: return f(Tag<float>{});
    case DType::kFloat64: return f(Tag<double>{});
    case DType::kFloat16: return f(Tag<typename Types::half>{});
    case DType::kBFloat16: return f(Tag<typename Types::bfloat16>{});
  }
  return DispatchFailure<R>::value();
}

// Calls f(Int<prediction_type>{}).
template <typename F>
auto dispatch_prediction(int prediction_type, F&& f) -> decltype(f(Int<kPredEps>{})) {
  using R = decltype(f(Int<kPredEps>{}));
  switch (prediction_type) {
    case kPredEps: return f(Int<kPredEps>{});
    case kPredX0: return f(Int<kPredX0>{});
    case kPredV: return f(Int<kPredV>{});
  }
  return DispatchFailure<R>::value();
}

// Calls f(Int<variance_type>{}) for any of the four variance types.
template <typename F>
auto dispatch_variance(int variance_type, F&& f) -> decltype(f(Int<kFixedSmall>{})) {
  using R = decltype(f(Int<kFixedSmall>{}));
  switch (variance_type) {
    case kFixedSmall: return f(Int<kFixedSmall>{});
    case kFixedLarge: return f(Int<kFixedLarge>{});
    case kLearnedRange: return f(Int<kLearnedRange>{});
    case kLearned: return f(Int<kLearned>{});
  }
  return DispatchFailure<R>::value();
}

// Calls f(Int<variance_type>{}) for the learned types only (the hybrid loss); the fixed types are a failure.
template <typename F>
auto dispatch_learned_variance(int variance_type, F&& f) -> decltype(f(Int<kLearnedRange>{})) {
  using R = decltype(f(Int<kLearnedRange>{}));
  switch (variance_type) {
    case kLearnedRange: return f(Int<kLearnedRange>{});
    case kLearned: return f(Int<kLearned>{});
  }
  return DispatchFailure<R>::value();
}

// Calls f(std::true_type{}) or f(std::false_type{}).
template <typename F>
auto dispatch_bool(bool value, F&& f) -> decltype(f(std::true_type{})) {
  if (value) return f(std::true_type{});
  return f(std::false_type{});
}

// ---- rows (kernel_args.h): element j of sample b sits at data + b * batch_stride + j ----

template <typename scalar_t>
DC_HD const scalar_t* row(const Rows& r, int64_t b) {
  return static_cast<const scalar_t*>(r.data) + b * r.batch_stride;
}

template <typename scalar_t>
DC_HD scalar_t* row(const OutRows& r, int64_t b) {
  return static_cast<scalar_t*>(r.data) + b * r.batch_stride;
}

DC_ISA_END
}  // namespace diffcore
