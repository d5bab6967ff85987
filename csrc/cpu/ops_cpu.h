// ops_cpu.h: what the CPU registration (cpu/ops_cpu.cpp) tells build_info() about the instruction-set variants.
#pragma once

#include <string>
#include <vector>

namespace diffcore {
namespace cpu {

// The CPU kernel variants compiled in, lowest instruction set first ("baseline", "avx2", "avx512").
std::vector<std::string> built_isas();

// The variant the ops run (chosen at the first call; raises on an unknown DIFFCORE_CPU_ISA value).
std::string selected_isa();

}  // namespace cpu
}  // namespace diffcore
