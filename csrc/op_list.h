// op_list.h: the one list of the diffcore ops and their schemas. ops.cpp defines the TORCH_LIBRARY schemas from
// it, ops.h registers every backend's implementations from it (BackendOps<Traits>::<name>), and module.cpp reports
// the names in build_info(). Adding an op: a line here, a BackendOps member, and its Python wrapper in
// diffcore/ops.py.
#pragma once

// X(name, "schema after the name")
#define DIFFCORE_FOR_EACH_OP(X)                                                                                   \
  X(q_sample, "(Tensor x0, Tensor noise, Tensor t, Tensor alphas_cumprod) -> Tensor")                             \
  X(ddim_step,                                                                                                    \
    "(Tensor x, Tensor model_output, Tensor t, Tensor t_prev, Tensor alphas_cumprod, float eta, "                 \
    "int prediction_type, bool clip_denoised, Tensor? noise, int seed, int offset, int first_row=0) "             \
    "-> (Tensor, Tensor)")                                                                                        \
  X(ddpm_step,                                                                                                    \
    "(Tensor x, Tensor model_output, Tensor t, Tensor alphas_cumprod, int prediction_type, "                      \
    "int variance_type, bool clip_denoised, Tensor? noise, int seed, int offset, int first_row=0) "               \
    "-> (Tensor, Tensor)")                                                                                        \
  X(hybrid_loss,                                                                                                  \
    "(Tensor model_output, Tensor x0, Tensor x_t, Tensor noise, Tensor t, Tensor alphas_cumprod, "                \
    "int prediction_type, int variance_type) -> (Tensor, Tensor)")                                                \
  X(hybrid_loss_backward,                                                                                         \
    "(Tensor grad_mse, Tensor grad_vb, Tensor model_output, Tensor x0, Tensor x_t, Tensor noise, Tensor t, "      \
    "Tensor alphas_cumprod, int prediction_type, int variance_type) -> Tensor")                                   \
  X(group_norm_act,                                                                                               \
    "(Tensor x, Tensor? weight, Tensor? bias, int num_groups, float eps, Tensor? scale, Tensor? shift, "          \
    "bool silu) -> Tensor")                                                                                       \
  X(attention_qkv, "(Tensor qkv, int num_heads) -> Tensor")
