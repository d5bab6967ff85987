// ops.h: the device-generic host functions of the diffcore ops. They check the inputs, bring every tensor into
// the row layout of kernel_args.h (copying only when a tensor is not already dense in x's layout), allocate the
// outputs and call the kernels of a Backend: the CPU one (ops.cpp) or the CUDA one (cuda/ops_cuda.cpp).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "kernel_args.h"

namespace diffcore {

struct Backend {
  const char* name;
  bool checks_timestep_values;  // CPU reads t to check its range; CUDA leaves that to the Python wrapper
  void (*q_sample)(const QSampleArgs&);
  void (*ddim_step)(const DdimStepArgs&);
  void (*ddpm_step)(const DdpmStepArgs&);
  void (*hybrid_loss_forward)(const HybridLossArgs&);
  void (*hybrid_loss_backward)(const HybridLossArgs&);
};

at::Tensor q_sample_impl(const Backend& backend, const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& t,
                         const at::Tensor& alphas_cumprod);

std::tuple<at::Tensor, at::Tensor> ddim_step_impl(const Backend& backend, const at::Tensor& x,
                                                  const at::Tensor& model_output, const at::Tensor& t,
                                                  const at::Tensor& t_prev, const at::Tensor& alphas_cumprod,
                                                  double eta, int64_t prediction_type, bool clip_denoised,
                                                  const c10::optional<at::Tensor>& noise, int64_t seed,
                                                  int64_t offset);

std::tuple<at::Tensor, at::Tensor> ddpm_step_impl(const Backend& backend, const at::Tensor& x,
                                                  const at::Tensor& model_output, const at::Tensor& t,
                                                  const at::Tensor& alphas_cumprod, int64_t prediction_type,
                                                  int64_t variance_type, bool clip_denoised,
                                                  const c10::optional<at::Tensor>& noise, int64_t seed,
                                                  int64_t offset);

std::tuple<at::Tensor, at::Tensor> hybrid_loss_impl(const Backend& backend, const at::Tensor& model_output,
                                                    const at::Tensor& x0, const at::Tensor& x_t,
                                                    const at::Tensor& noise, const at::Tensor& t,
                                                    const at::Tensor& alphas_cumprod, int64_t prediction_type,
                                                    int64_t variance_type);

at::Tensor hybrid_loss_backward_impl(const Backend& backend, const at::Tensor& grad_mse, const at::Tensor& grad_vb,
                                     const at::Tensor& model_output, const at::Tensor& x0, const at::Tensor& x_t,
                                     const at::Tensor& noise, const at::Tensor& t, const at::Tensor& alphas_cumprod,
                                     int64_t prediction_type, int64_t variance_type);

}  // namespace diffcore
