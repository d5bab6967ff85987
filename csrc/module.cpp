// module.cpp: the pybind11 part of diffcore._C. Importing the module also loads the TORCH_LIBRARY(diffcore)
// registrations of ops.cpp (and cuda/ops_cuda.cpp in CUDA builds), which live in the same shared library.
#include <torch/extension.h>

#include "cpu/ops_cpu.h"
#include "op_list.h"

#ifndef DIFFCORE_VERSION
#define DIFFCORE_VERSION "unknown"
#endif
#ifndef DIFFCORE_TORCH_VERSION
#define DIFFCORE_TORCH_VERSION "unknown"
#endif
#ifndef DIFFCORE_CUDA_ARCHS
#define DIFFCORE_CUDA_ARCHS ""
#endif

namespace {

std::string compiler() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return "gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__) + "." +
         std::to_string(__GNUC_PATCHLEVEL__);
#else
  return "unknown";
#endif
}

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = DIFFCORE_VERSION;
#ifdef DIFFCORE_WITH_CUDA
  info["with_cuda"] = true;
#else
  info["with_cuda"] = false;
#endif
  info["cuda_archs"] = DIFFCORE_CUDA_ARCHS;
  info["compiler"] = compiler();
  info["torch_version"] = DIFFCORE_TORCH_VERSION;
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["cpu_isas"] = diffcore::cpu::built_isas();
  info["cpu_isa"] = diffcore::cpu::selected_isa();
#define DIFFCORE_OP_NAME(name, schema) #name,
  info["ops"] = std::vector<std::string>{DIFFCORE_FOR_EACH_OP(DIFFCORE_OP_NAME)};
#undef DIFFCORE_OP_NAME
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "diffcore fused kernels (ops are registered under torch.ops.diffcore)";
  m.def("build_info", &build_info,
        "What this extension was built with: version, torch version, CUDA, arch list, compiler, the CPU kernel "
        "variants built (cpu_isas) and the one in use (cpu_isa).");
}
