// ops_cpu.cpp: the CPU registration of the diffcore ops. The checks, layouts and output allocation are the
// device-generic host functions of ops.cpp; this file gives them a Backend that runs the CPU kernels of one
// instruction-set variant (cpu/kernels_cpu.h), chosen once, at the first call, from what the CPU supports
// (__builtin_cpu_supports, as ATen does) and the environment variable DIFFCORE_CPU_ISA = baseline | avx2 | avx512 |
// avx512_bf16.
// A request above what the CPU runs (or above what was built) is lowered to the best variant that runs, with a
// warning; an unknown value is an error. Compiled for the portable baseline, like everything outside the variants.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "cpu/kernels_cpu.h"
#include "ops.h"

namespace diffcore {
namespace cpu {
namespace {

// Variants built, from the lowest instruction set to the highest.
std::vector<const Kernels*> built() {
  std::vector<const Kernels*> list{&isa_baseline::kernels()};
#if defined(DIFFCORE_CPU_HAVE_AVX2)
  list.push_back(&isa_avx2::kernels());
#endif
#if defined(DIFFCORE_CPU_HAVE_AVX512)
  list.push_back(&isa_avx512::kernels());
#endif
#if defined(DIFFCORE_CPU_HAVE_AVX512_BF16)
  list.push_back(&isa_avx512_bf16::kernels());
#endif
  return list;
}

// True when this CPU runs the variant's instructions (x86-64-v3 / v4 as GCC's -march levels define them).
bool cpu_runs(const std::string& isa) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("f16c");
  if (isa == "avx2") return v3;
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                  __builtin_cpu_supports("avx512cd");
  if (isa == "avx512") return v4;
  if (isa == "avx512_bf16") return v4 && __builtin_cpu_supports("avx512bf16");
#endif
  return isa == "baseline";
}

const Kernels& choose() {
  const std::vector<const Kernels*> variants = built();
  const Kernels* best = variants.front();
  for (const Kernels* k : variants) {
    if (cpu_runs(k->isa)) best = k;
  }
  const char* env = std::getenv("DIFFCORE_CPU_ISA");
  if (env == nullptr || *env == '\0') return *best;
  const std::string wanted(env);
  TORCH_CHECK(wanted == "baseline" || wanted == "avx2" || wanted == "avx512" || wanted == "avx512_bf16",
              "DIFFCORE_CPU_ISA: expected baseline, avx2, avx512 or avx512_bf16, got '", wanted, "'");
  for (const Kernels* k : variants) {
    if (wanted == k->isa && cpu_runs(k->isa)) return *k;
  }
  TORCH_WARN("DIFFCORE_CPU_ISA=", wanted, ": this ", cpu_runs(wanted) ? "build has no such variant" : "CPU cannot run it",
             "; using the ", best->isa, " kernels");
  return *best;
}

const Kernels& selected() {
  static const Kernels& kernels = choose();  // thread-safe, once, at the first op call
  return kernels;
}

void run_parallel(int64_t n, int64_t grain, void* ctx, void (*body)(void*, int64_t, int64_t)) {
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { body(ctx, begin, end); });
}

constexpr Parallel kParallel{run_parallel};

void check_ran(bool ran, const char* op) {
  TORCH_CHECK(ran, "diffcore::", op, ": a dtype, prediction_type or variance_type value the CPU kernels do not know "
              "reached them");
}

void q_sample_cpu(const QSampleArgs& a) { check_ran(selected().q_sample(a, kParallel), "q_sample"); }
void ddim_step_cpu(const DdimStepArgs& a) { check_ran(selected().ddim_step(a, kParallel), "ddim_step"); }
void ddpm_step_cpu(const DdpmStepArgs& a) { check_ran(selected().ddpm_step(a, kParallel), "ddpm_step"); }
void hybrid_loss_forward_cpu(const HybridLossArgs& a) {
  check_ran(selected().hybrid_loss_forward(a, kParallel), "hybrid_loss");
}
void hybrid_loss_backward_cpu(const HybridLossArgs& a) {
  check_ran(selected().hybrid_loss_backward(a, kParallel), "hybrid_loss_backward");
}

void group_norm_act_cpu(const GroupNormArgs& a) {
  check_ran(selected().group_norm_act(a, kParallel), "group_norm_act");
}

void attention_qkv_cpu(const AttentionArgs& a) {
  TORCH_CHECK(selected().attention_qkv(a, kParallel), "diffcore::attention_qkv: the CPU kernel could not "
              "allocate its scratch (", a.tokens, " tokens, head dim ", a.head_dim, ") or got a dtype it does not know");
}

const Backend kCpuBackend{"cpu",
                          true,
                          q_sample_cpu,
                          ddim_step_cpu,
                          ddpm_step_cpu,
                          hybrid_loss_forward_cpu,
                          hybrid_loss_backward_cpu,
                          group_norm_act_cpu,
                          true,
                          attention_qkv_cpu};

struct CpuTraits {
  static const Backend& backend() { return kCpuBackend; }
  struct Guard {  // no device to select on CPU
    explicit Guard(const at::Tensor&) {}
  };
};

}  // namespace

std::vector<std::string> built_isas() {
  std::vector<std::string> names;
  for (const Kernels* k : built()) names.emplace_back(k->isa);
  return names;
}

std::string selected_isa() { return selected().isa; }

}  // namespace cpu
}  // namespace diffcore

TORCH_LIBRARY_IMPL(diffcore, CPU, m) { diffcore::register_backend_ops<diffcore::cpu::CpuTraits>(m); }
