// kernels.h: the CUDA launchers of the fused ops (csrc/cuda/kernels.cu). Torch-free: raw pointers, sizes, strides
// and a cudaStream_t, so that nvcc compiles the kernels on a machine whose torch is a CPU build; the torch binding
// is csrc/cuda/ops_cuda.cpp.
//
// Every launcher returns cudaSuccess without launching on empty input (batch or inner 0), cudaErrorInvalidValue
// for arguments the kernels cannot run with (an unknown dtype or switch, a table too short, a missing workspace),
// and otherwise the cudaGetLastError() after its launches. Timestep values are clamped into the table's range
// inside the kernels (the Python wrapper checks them; the kernels never read out of bounds).
#pragma once

#include <cuda_runtime.h>
#include <stddef.h>

#include "kernel_args.h"

namespace diffcore {
namespace cuda {

// x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.
cudaError_t q_sample(const QSampleArgs& args, cudaStream_t stream);

// Generalized DDIM step t -> t_prev; in-kernel Philox noise when args.noise.given.data is null and eta != 0.
cudaError_t ddim_step(const DdimStepArgs& args, cudaStream_t stream);

// Ancestral DDPM step; in-kernel Philox noise when args.noise.given.data is null.
cudaError_t ddpm_step(const DdpmStepArgs& args, cudaStream_t stream);

// Bytes of device memory hybrid_loss_forward needs as `workspace` (0 when every sample fits one tile, i.e. inner
// up to 4096 elements for float32 and 8192 for 16-bit types). A function of dtype, batch and inner only.
size_t hybrid_loss_forward_workspace_bytes(const HybridLossArgs& args);

// Per-sample mse and vb (args.mse, args.vb: batch values of float, or double for float64) by a deterministic
// two-stage reduction: per-(sample, tile) partial sums in double, then a fixed-order sum per sample.
cudaError_t hybrid_loss_forward(const HybridLossArgs& args, void* workspace, cudaStream_t stream);

// Gradients with respect to the prediction and variance outputs (elementwise).
cudaError_t hybrid_loss_backward(const HybridLossArgs& args, cudaStream_t stream);

// GroupNorm + per-sample scale-shift + optional SiLU: one block per (image, group), two passes over the group's
// values (shifted sums merged in double, then the elementwise formula of formulas.h).
cudaError_t group_norm_act(const GroupNormArgs& args, cudaStream_t stream);

// Softmax attention of packed q|k|v features: one block per (sequence, head), one thread per query row, an
// online softmax over the keys (no scores buffer: any T). Head dims up to kAttentionMaxHeadDim (larger:
// cudaErrorInvalidValue; the binding checks first).
constexpr int64_t kAttentionMaxHeadDim = 128;
cudaError_t attention_qkv(const AttentionArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace diffcore
