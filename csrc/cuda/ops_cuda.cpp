// ops_cuda.cpp: the CUDA registration of the diffcore ops (compiled only in CUDA builds, DIFFCORE_WITH_CUDA).
// The checks, layouts and output allocation are the device-generic host functions of ops.cpp; this file gives them
// a Backend whose launch functions call the kernels of kernels.cu on the current stream of the input's device
// (selected by a device guard), turning a launch error into a RuntimeError. Timestep values are not read here
// (no host-device sync): the Python wrappers check them, and the kernels clamp them into range.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/kernels.h"
#include "ops.h"

namespace diffcore {
namespace {

void check_launch(const char* op, cudaError_t error) {
  TORCH_CHECK(error == cudaSuccess, "diffcore::", op, ": CUDA kernel launch failed: ", cudaGetErrorString(error),
              " (", static_cast<int>(error), ")");
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void q_sample_cuda(const QSampleArgs& a) { check_launch("q_sample", cuda::q_sample(a, current_stream())); }

void ddim_step_cuda(const DdimStepArgs& a) { check_launch("ddim_step", cuda::ddim_step(a, current_stream())); }

void ddpm_step_cuda(const DdpmStepArgs& a) { check_launch("ddpm_step", cuda::ddpm_step(a, current_stream())); }

// The two-stage reduction's partial sums live in a workspace from torch's caching allocator (stream-ordered and
// CUDA-graph safe); freeing it right after the launch is safe because later work on this stream is ordered after.
void hybrid_loss_forward_cuda(const HybridLossArgs& a) {
  const size_t bytes = cuda::hybrid_loss_forward_workspace_bytes(a);
  at::Tensor workspace;
  if (bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(bytes)},
                          at::TensorOptions().dtype(at::kByte).device(at::kCUDA, c10::cuda::current_device()));
  }
  check_launch("hybrid_loss",
               cuda::hybrid_loss_forward(a, bytes > 0 ? workspace.data_ptr() : nullptr, current_stream()));
}

void hybrid_loss_backward_cuda(const HybridLossArgs& a) {
  check_launch("hybrid_loss_backward", cuda::hybrid_loss_backward(a, current_stream()));
}

void group_norm_act_cuda(const GroupNormArgs& a) {
  check_launch("group_norm_act", cuda::group_norm_act(a, current_stream()));
}

void attention_qkv_cuda(const AttentionArgs& a) {
  TORCH_CHECK(a.head_dim <= cuda::kAttentionMaxHeadDim, "qkv: the CUDA attention kernel takes head dims up to ",
              cuda::kAttentionMaxHeadDim, " (C / num_heads), got ", a.head_dim);
  check_launch("attention_qkv", cuda::attention_qkv(a, current_stream()));
}

const Backend kCudaBackend{"cuda",
                           false,  // reading t's values would sync with the host; the Python wrapper checks them
                           q_sample_cuda,
                           ddim_step_cuda,
                           ddpm_step_cuda,
                           hybrid_loss_forward_cuda,
                           hybrid_loss_backward_cuda,
                           group_norm_act_cuda,
                           false,  // one block per (image, group) reduces in shared memory: no workspace
                           attention_qkv_cuda};

struct CudaTraits {
  static const Backend& backend() { return kCudaBackend; }
  // Selects the device of the op's first image tensor when it is a CUDA tensor; with a tensor elsewhere the
  // generic checks report the device mismatch by argument name.
  struct Guard {
    explicit Guard(const at::Tensor& tensor) {
      if (tensor.is_cuda()) guard.set_device(tensor.device());
    }
    c10::cuda::OptionalCUDAGuard guard;
  };
};

}  // namespace
}  // namespace diffcore

TORCH_LIBRARY_IMPL(diffcore, CUDA, m) { diffcore::register_backend_ops<diffcore::CudaTraits>(m); }
