// kernels_cpu.h: the CPU kernels of the fused ops (csrc/cpu/kernels_cpu.cpp), compiled once per instruction set.
// Torch-free: the bindings (csrc/cpu/ops_cpu.cpp) hand over argument structs (kernel_args.h) and a parallel-for.
//
// setup.py compiles kernels_cpu.cpp with DIFFCORE_CPU_ISA_NS = isa_baseline (portable x86-64, or the only variant
// on other architectures), isa_avx2 (x86-64-v3: AVX2, FMA, F16C; FMA contraction stays off), isa_avx512
// (x86-64-v4) and isa_avx512_bf16 (x86-64-v4 + AVX512-BF16: vcvtne2ps2bf16 in group_norm_act's bfloat16 stores), and
// defines DIFFCORE_CPU_HAVE_AVX2 / _AVX512 / _AVX512_BF16 for the variants it built. The bindings pick one at run
// time (cpu/ops_cpu.cpp).
#pragma once

#include <stdint.h>

#include "kernel_args.h"

namespace diffcore {
namespace cpu {

// A parallel loop over [0, n) in chunks of at least `grain`: run(n, grain, ctx, body) calls body(ctx, begin, end)
// for each chunk (at::parallel_for in the bindings).
struct Parallel {
  void (*run)(int64_t n, int64_t grain, void* ctx, void (*body)(void* ctx, int64_t begin, int64_t end));
};

// The kernels of one instruction set. Each returns false when a dtype or enum value outside its switch reached it
// (ops.cpp rejects those first), true when it ran.
struct Kernels {
  const char* isa;  // "baseline", "avx2", "avx512" or "avx512_bf16"
  bool (*q_sample)(const QSampleArgs&, const Parallel&);
  bool (*ddim_step)(const DdimStepArgs&, const Parallel&);
  bool (*ddpm_step)(const DdpmStepArgs&, const Parallel&);
  bool (*hybrid_loss_forward)(const HybridLossArgs&, const Parallel&);
  bool (*hybrid_loss_backward)(const HybridLossArgs&, const Parallel&);
  bool (*group_norm_act)(const GroupNormArgs&, const Parallel&);
  bool (*attention_qkv)(const AttentionArgs&, const Parallel&);  // also false when its scratch could not be allocated
};

namespace isa_baseline {
const Kernels& kernels();
}
#if defined(DIFFCORE_CPU_HAVE_AVX2)
namespace isa_avx2 {
const Kernels& kernels();
}
#endif
#if defined(DIFFCORE_CPU_HAVE_AVX512)
namespace isa_avx512 {
const Kernels& kernels();
}
#endif
#if defined(DIFFCORE_CPU_HAVE_AVX512_BF16)
namespace isa_avx512_bf16 {
const Kernels& kernels();
}
#endif

}  // namespace cpu
}  // namespace diffcore
