// CPU kernels of the fused ops (csrc/cpu/kernels_cpu.cpp); arguments prepared by csrc/ops.cpp.
#pragma once

#include "kernel_args.h"

namespace diffcore {
namespace cpu {

void q_sample(const QSampleArgs& args);
void ddim_step(const DdimStepArgs& args);
void ddpm_step(const DdpmStepArgs& args);
void hybrid_loss_forward(const HybridLossArgs& args);
void hybrid_loss_backward(const HybridLossArgs& args);

}  // namespace cpu
}  // namespace diffcore
