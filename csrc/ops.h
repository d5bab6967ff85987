// ops.h: the device-generic host functions of the diffcore ops. They check the inputs, bring every tensor into
// the row layout of kernel_args.h (copying only when a tensor is not already dense in x's layout), allocate the
// outputs and call the kernels of a Backend: the CPU one (ops.cpp) or the CUDA one (cuda/ops_cuda.cpp).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "kernel_args.h"
#include "op_list.h"

namespace diffcore {

struct Backend {
  const char* name;
  bool checks_timestep_values;  // CPU reads t to check its range; CUDA leaves that to the Python wrapper
  void (*q_sample)(const QSampleArgs&);
  void (*ddim_step)(const DdimStepArgs&);
  void (*ddpm_step)(const DdpmStepArgs&);
  void (*hybrid_loss_forward)(const HybridLossArgs&);
  void (*hybrid_loss_backward)(const HybridLossArgs&);
  void (*group_norm_act)(const GroupNormArgs&);
  bool group_norm_needs_workspace;  // CPU: GroupNormArgs::workspace is allocated by the host function
  void (*attention_qkv)(const AttentionArgs&);
};

at::Tensor q_sample_impl(const Backend& backend, const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& t,
                         const at::Tensor& alphas_cumprod);

std::tuple<at::Tensor, at::Tensor> ddim_step_impl(const Backend& backend, const at::Tensor& x,
                                                  const at::Tensor& model_output, const at::Tensor& t,
                                                  const at::Tensor& t_prev, const at::Tensor& alphas_cumprod,
                                                  double eta, int64_t prediction_type, bool clip_denoised,
                                                  const c10::optional<at::Tensor>& noise, int64_t seed,
                                                  int64_t offset, int64_t first_row);

std::tuple<at::Tensor, at::Tensor> ddpm_step_impl(const Backend& backend, const at::Tensor& x,
                                                  const at::Tensor& model_output, const at::Tensor& t,
                                                  const at::Tensor& alphas_cumprod, int64_t prediction_type,
                                                  int64_t variance_type, bool clip_denoised,
                                                  const c10::optional<at::Tensor>& noise, int64_t seed,
                                                  int64_t offset, int64_t first_row);

std::tuple<at::Tensor, at::Tensor> hybrid_loss_impl(const Backend& backend, const at::Tensor& model_output,
                                                    const at::Tensor& x0, const at::Tensor& x_t,
                                                    const at::Tensor& noise, const at::Tensor& t,
                                                    const at::Tensor& alphas_cumprod, int64_t prediction_type,
                                                    int64_t variance_type);

at::Tensor hybrid_loss_backward_impl(const Backend& backend, const at::Tensor& grad_mse, const at::Tensor& grad_vb,
                                     const at::Tensor& model_output, const at::Tensor& x0, const at::Tensor& x_t,
                                     const at::Tensor& noise, const at::Tensor& t, const at::Tensor& alphas_cumprod,
                                     int64_t prediction_type, int64_t variance_type);

at::Tensor group_norm_act_impl(const Backend& backend, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias, int64_t num_groups, double eps,
                               const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
                               bool silu);

at::Tensor attention_qkv_impl(const Backend& backend, const at::Tensor& qkv, int64_t num_heads);

// The op entry points of one backend, in the schemas' argument order. Traits provides
// `static const Backend& backend()` and a `Guard` type constructed from the op's first image tensor (an RAII
// device guard on CUDA, a no-op on CPU). register_backend_ops<Traits>(m) registers all the ops, so that the CPU
// registration (ops.cpp) and the CUDA one (cuda/ops_cuda.cpp) share one list.
template <typename Traits>
struct BackendOps {
  static at::Tensor q_sample(const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& t,
                             const at::Tensor& alphas_cumprod) {
    const typename Traits::Guard guard(x0);
    return q_sample_impl(Traits::backend(), x0, noise, t, alphas_cumprod);
  }

  static std::tuple<at::Tensor, at::Tensor> ddim_step(const at::Tensor& x, const at::Tensor& model_output,
                                                      const at::Tensor& t, const at::Tensor& t_prev,
                                                      const at::Tensor& alphas_cumprod, double eta,
                                                      int64_t prediction_type, bool clip_denoised,
                                                      const c10::optional<at::Tensor>& noise, int64_t seed,
                                                      int64_t offset, int64_t first_row) {
    const typename Traits::Guard guard(x);
    return ddim_step_impl(Traits::backend(), x, model_output, t, t_prev, alphas_cumprod, eta, prediction_type,
                          clip_denoised, noise, seed, offset, first_row);
  }

  static std::tuple<at::Tensor, at::Tensor> ddpm_step(const at::Tensor& x, const at::Tensor& model_output,
                                                      const at::Tensor& t, const at::Tensor& alphas_cumprod,
                                                      int64_t prediction_type, int64_t variance_type,
                                                      bool clip_denoised, const c10::optional<at::Tensor>& noise,
                                                      int64_t seed, int64_t offset, int64_t first_row) {
    const typename Traits::Guard guard(x);
    return ddpm_step_impl(Traits::backend(), x, model_output, t, alphas_cumprod, prediction_type, variance_type,
                          clip_denoised, noise, seed, offset, first_row);
  }

  static std::tuple<at::Tensor, at::Tensor> hybrid_loss(const at::Tensor& model_output, const at::Tensor& x0,
                                                        const at::Tensor& x_t, const at::Tensor& noise,
                                                        const at::Tensor& t, const at::Tensor& alphas_cumprod,
                                                        int64_t prediction_type, int64_t variance_type) {
    const typename Traits::Guard guard(x0);
    return hybrid_loss_impl(Traits::backend(), model_output, x0, x_t, noise, t, alphas_cumprod, prediction_type,
                            variance_type);
  }

  static at::Tensor hybrid_loss_backward(const at::Tensor& grad_mse, const at::Tensor& grad_vb,
                                         const at::Tensor& model_output, const at::Tensor& x0,
                                         const at::Tensor& x_t, const at::Tensor& noise, const at::Tensor& t,
                                         const at::Tensor& alphas_cumprod, int64_t prediction_type,
                                         int64_t variance_type) {
    const typename Traits::Guard guard(x0);
    return hybrid_loss_backward_impl(Traits::backend(), grad_mse, grad_vb, model_output, x0, x_t, noise, t,
                                     alphas_cumprod, prediction_type, variance_type);
  }

  static at::Tensor group_norm_act(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                   const c10::optional<at::Tensor>& bias, int64_t num_groups, double eps,
                                   const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
                                   bool silu) {
    const typename Traits::Guard guard(x);
    return group_norm_act_impl(Traits::backend(), x, weight, bias, num_groups, eps, scale, shift, silu);
  }

  static at::Tensor attention_qkv(const at::Tensor& qkv, int64_t num_heads) {
    const typename Traits::Guard guard(qkv);
    return attention_qkv_impl(Traits::backend(), qkv, num_heads);
  }
};

// Registers every op of op_list.h for one backend.
template <typename Traits>
void register_backend_ops(torch::Library& m) {
#define DIFFCORE_IMPL_OP(name, schema) m.impl(#name, &BackendOps<Traits>::name);
  DIFFCORE_FOR_EACH_OP(DIFFCORE_IMPL_OP)
#undef DIFFCORE_IMPL_OP
}

}  // namespace diffcore
