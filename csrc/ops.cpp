// ops.cpp: the TORCH_LIBRARY(diffcore) schemas and the device-generic host functions (checks, layouts, outputs);
// the backends register in cpu/ops_cpu.cpp and cuda/ops_cuda.cpp.
#include "ops.h"

#include <torch/library.h>

#include <cmath>
#include <string>
#include <vector>

#include "op_list.h"

namespace diffcore {
namespace {

// ---- checks: every message names the argument, what was expected and what came ----

void check_float(const char* name, const at::Tensor& tensor) {
  const auto st = tensor.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, name,
              ": expected dtype float32, float64, float16 or bfloat16, got ", st);
  TORCH_CHECK(tensor.dim() >= 1, name, ": expected a tensor with a batch dimension, got a 0-d tensor");
}

void check_device(const char* name, const at::Tensor& tensor, const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(tensor.device() == ref.device(), name, ": expected a tensor on ", ref.device(), " (where ", ref_name,
              " is), got one on ", tensor.device());
}

void check_like(const char* name, const at::Tensor& tensor, const char* ref_name, const at::Tensor& ref) {
  check_float(name, tensor);
  TORCH_CHECK(tensor.sizes() == ref.sizes(), name, ": expected shape ", ref.sizes(), " (that of ", ref_name,
              "), got ", tensor.sizes());
  TORCH_CHECK(tensor.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(), " (that of ",
              ref_name, "), got ", tensor.scalar_type());
  check_device(name, tensor, ref_name, ref);
}

void check_table(const at::Tensor& table, const at::Tensor& ref, int64_t min_length) {
  TORCH_CHECK(table.scalar_type() == at::kDouble && table.dim() == 1,
              "alphas_cumprod: expected a 1-D float64 schedule table, got a ", table.scalar_type(),
              " tensor of shape ", table.sizes());
  TORCH_CHECK(table.numel() >= min_length, "alphas_cumprod: expected at least ", min_length, " timesteps, got ",
              table.numel());
  check_device("alphas_cumprod", table, "the inputs", ref);
}

void check_timesteps(const Backend& backend, const char* name, const at::Tensor& t, const at::Tensor& ref,
                     int64_t num_timesteps, bool allow_negative) {
  TORCH_CHECK(t.scalar_type() == at::kLong, name, ": expected an int64 tensor of timesteps, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == ref.size(0), name, ": expected shape (", ref.size(0),
              ",) (one timestep per sample), got ", t.sizes());
  check_device(name, t, "the inputs", ref);
  if (!backend.checks_timestep_values || t.numel() == 0) return;
  const at::Tensor tc = t.contiguous();
  const int64_t* data = tc.data_ptr<int64_t>();
  for (int64_t i = 0; i < tc.numel(); ++i) {
    TORCH_CHECK(data[i] < num_timesteps && (allow_negative || data[i] >= 0), name, ": expected timesteps ",
                allow_negative ? "< " : "in [0, ", num_timesteps, allow_negative ? "" : ")", ", got ", data[i],
                " at index ", i);
  }
}

void check_prediction_type(int64_t prediction_type) {
  TORCH_CHECK(prediction_type >= kPredEps && prediction_type <= kPredV,
              "prediction_type: expected 0 (eps), 1 (x0) or 2 (v), got ", prediction_type);
}

void check_variance_type(int64_t variance_type) {
  TORCH_CHECK(variance_type >= kFixedSmall && variance_type <= kLearned,
              "variance_type: expected 0 (fixed_small), 1 (fixed_large), 2 (learned_range) or 3 (learned), got ",
              variance_type);
}

bool is_learned(int64_t variance_type) { return variance_type == kLearnedRange || variance_type == kLearned; }

// model_output must be x's shape, with 2C channels along dim 1 when the variance is learned.
void check_model_output(const at::Tensor& model_output, const at::Tensor& x, const char* x_name, bool learned) {
  check_float("model_output", model_output);
  std::vector<int64_t> expected(x.sizes().begin(), x.sizes().end());
  if (learned) {
    TORCH_CHECK(x.dim() >= 2, x_name, ": a learned variance needs a channel dimension (dim 1), got shape ",
                x.sizes());
    expected[1] *= 2;
  }
  TORCH_CHECK(model_output.sizes() == at::IntArrayRef(expected), "model_output: expected shape ",
              at::IntArrayRef(expected), learned ? " (2C channels: the prediction then the variance output)" : "",
              ", got ", model_output.sizes());
  TORCH_CHECK(model_output.scalar_type() == x.scalar_type(), "model_output: expected dtype ", x.scalar_type(),
              " (that of ", x_name, "), got ", model_output.scalar_type());
  check_device("model_output", model_output, x_name, x);
}

// ---- layout: B rows of `inner` dense elements ----

// channels_last only for a 4-D tensor that is channels_last and not also contiguous (diffcore.reference.philox
// .kernel_memory_format applies the same rule).
at::MemoryFormat kernel_format(const at::Tensor& x) {
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

// True when element j of every row b sits at data + b * stride(0) + j in the order of `format`.
bool rows_are_dense(const at::Tensor& tensor, at::MemoryFormat format) {
  if (tensor.is_contiguous(format)) return true;
  const auto sizes = tensor.sizes();
  const auto strides = tensor.strides();
  std::vector<int64_t> order;  // inner dims from fastest to slowest
  if (format == at::MemoryFormat::ChannelsLast) {
    order = {1, 3, 2};
  } else {
    for (int64_t d = tensor.dim() - 1; d >= 1; --d) order.push_back(d);
  }
  int64_t expected = 1;
  for (int64_t d : order) {
    if (sizes[d] != 1 && strides[d] != expected) return false;
    expected *= sizes[d];
  }
  return true;
}

at::Tensor dense_rows(const at::Tensor& tensor, at::MemoryFormat format) {
  return rows_are_dense(tensor, format) ? tensor : tensor.contiguous(format);
}

Rows rows_of(const at::Tensor& tensor) { return Rows{tensor.data_ptr(), tensor.size(0) > 1 ? tensor.stride(0) : 0}; }

OutRows out_rows_of(at::Tensor& tensor) {
  return OutRows{tensor.data_ptr(), tensor.size(0) > 1 ? tensor.stride(0) : 0};
}

DType dtype_of(const at::Tensor& tensor) {
  switch (tensor.scalar_type()) {
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: return DType::kFloat32;
  }
}

at::ScalarType compute_dtype(const at::Tensor& tensor) {
  return tensor.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

int64_t inner_numel(const at::Tensor& x) { return x.size(0) > 0 ? x.numel() / x.size(0) : 0; }

// first_row: the index of x's first row in the seed's image numbering (row b draws counter word first_row + b,
// philox.h); checked whether or not the noise is given, like the Python wrappers do.
void check_first_row(int64_t first_row, int64_t batch) {
  constexpr int64_t kImages = int64_t(1) << 32;  // the counter word that numbers the images
  TORCH_CHECK(first_row >= 0 && first_row <= kImages - batch, "first_row: expected an int in [0, 2**32 - B] with B = ",
              batch, " rows (row b is image first_row + b of the seed, which numbers 2**32 images), got ", first_row);
}

Noise make_noise(const c10::optional<at::Tensor>& noise, const at::Tensor& x, at::MemoryFormat format,
                 at::Tensor& keep_alive, int64_t seed, int64_t offset, int64_t first_row) {
  check_first_row(first_row, x.size(0));
  Noise n{Rows{nullptr, 0}, 0, 0, 0};
  if (noise.has_value() && noise->defined()) {
    check_like("noise", *noise, "x", x);
    keep_alive = dense_rows(*noise, format);
    n.given = rows_of(keep_alive);
  } else {
    TORCH_CHECK(seed >= 0, "seed: expected >= 0, got ", seed);
    TORCH_CHECK(offset >= 0, "offset: expected >= 0, got ", offset);
  }
  n.seed = (uint64_t)seed;
  n.offset = (uint64_t)offset;
  n.first_row = (uint64_t)first_row;
  return n;
}

// The prediction part (first C channels) and, for learned variances, the variance part of model_output.
std::pair<at::Tensor, at::Tensor> split_model_output(const at::Tensor& model_output, int64_t channels, bool learned,
                                                     at::MemoryFormat format) {
  if (!learned) return {dense_rows(model_output, format), at::Tensor()};
  return {dense_rows(model_output.narrow(1, 0, channels), format),
          dense_rows(model_output.narrow(1, channels, channels), format)};
}

}  // namespace

at::Tensor q_sample_impl(const Backend& backend, const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& t,
                         const at::Tensor& alphas_cumprod) {
  check_float("x0", x0);
  check_like("noise", noise, "x0", x0);
  check_table(alphas_cumprod, x0, 1);
  check_timesteps(backend, "t", t, x0, alphas_cumprod.size(0), false);
  const auto format = kernel_format(x0);
  const at::Tensor x0_rows = dense_rows(x0, format), noise_rows = dense_rows(noise, format);
  const at::Tensor t_c = t.contiguous(), table = alphas_cumprod.contiguous();
  at::Tensor out = at::empty(x0.sizes(), x0.options().memory_format(format));
  if (out.numel() == 0) return out;
  QSampleArgs args{dtype_of(x0), x0.size(0), inner_numel(x0), rows_of(x0_rows), rows_of(noise_rows),
                   t_c.data_ptr<int64_t>(), table.data_ptr<double>(), table.numel(), out_rows_of(out)};
  backend.q_sample(args);
  return out;
}

std::tuple<at::Tensor, at::Tensor> ddim_step_impl(const Backend& backend, const at::Tensor& x,
                                                  const at::Tensor& model_output, const at::Tensor& t,
                                                  const at::Tensor& t_prev, const at::Tensor& alphas_cumprod,
                                                  double eta, int64_t prediction_type, bool clip_denoised,
                                                  const c10::optional<at::Tensor>& noise, int64_t seed,
                                                  int64_t offset, int64_t first_row) {
  check_float("x", x);
  check_model_output(model_output, x, "x", false);
  check_table(alphas_cumprod, x, 1);
  check_timesteps(backend, "t", t, x, alphas_cumprod.size(0), false);
  check_timesteps(backend, "t_prev", t_prev, x, alphas_cumprod.size(0), true);
  check_prediction_type(prediction_type);
  TORCH_CHECK(eta >= 0.0, "eta: expected a float >= 0, got ", eta);
  const auto format = kernel_format(x);
  at::Tensor noise_keep;
  const Noise n = make_noise(noise, x, format, noise_keep, seed, offset, first_row);
  const at::Tensor x_rows = dense_rows(x, format), pred_rows = dense_rows(model_output, format);
  const at::Tensor t_c = t.contiguous(), t_prev_c = t_prev.contiguous(), table = alphas_cumprod.contiguous();
  at::Tensor x_prev = at::empty(x.sizes(), x.options().memory_format(format));
  at::Tensor pred_x0 = at::empty(x.sizes(), x.options().memory_format(format));
  if (x.numel() == 0) return {x_prev, pred_x0};
  DdimStepArgs args{dtype_of(x), x.size(0), inner_numel(x), rows_of(x_rows), rows_of(pred_rows),
                    t_c.data_ptr<int64_t>(), t_prev_c.data_ptr<int64_t>(), table.data_ptr<double>(), table.numel(),
                    eta, (int)prediction_type, clip_denoised, n, out_rows_of(x_prev), out_rows_of(pred_x0)};
  backend.ddim_step(args);
  return {x_prev, pred_x0};
}

std::tuple<at::Tensor, at::Tensor> ddpm_step_impl(const Backend& backend, const at::Tensor& x,
                                                  const at::Tensor& model_output, const at::Tensor& t,
                                                  const at::Tensor& alphas_cumprod, int64_t prediction_type,
                                                  int64_t variance_type, bool clip_denoised,
                                                  const c10::optional<at::Tensor>& noise, int64_t seed,
                                                  int64_t offset, int64_t first_row) {
  check_float("x", x);
  check_variance_type(variance_type);
  check_prediction_type(prediction_type);
  const bool learned = is_learned(variance_type);
  check_model_output(model_output, x, "x", learned);
  check_table(alphas_cumprod, x, 2);
  check_timesteps(backend, "t", t, x, alphas_cumprod.size(0), false);
  const auto format = kernel_format(x);
  at::Tensor noise_keep;
  const Noise n = make_noise(noise, x, format, noise_keep, seed, offset, first_row);
  const at::Tensor x_rows = dense_rows(x, format);
  const auto parts = split_model_output(model_output, learned ? x.size(1) : 0, learned, format);
  const at::Tensor t_c = t.contiguous(), table = alphas_cumprod.contiguous();
  at::Tensor x_prev = at::empty(x.sizes(), x.options().memory_format(format));
  at::Tensor pred_x0 = at::empty(x.sizes(), x.options().memory_format(format));
  if (x.numel() == 0) return {x_prev, pred_x0};
  DdpmStepArgs args{dtype_of(x), x.size(0), inner_numel(x), rows_of(x_rows), rows_of(parts.first),
                    learned ? rows_of(parts.second) : Rows{nullptr, 0}, t_c.data_ptr<int64_t>(),
                    table.data_ptr<double>(), table.numel(), (int)prediction_type, (int)variance_type,
                    clip_denoised, n, out_rows_of(x_prev), out_rows_of(pred_x0)};
  backend.ddpm_step(args);
  return {x_prev, pred_x0};
}

namespace {

// Checks and layouts shared by the hybrid loss forward and backward; keeps the dense tensors alive.
struct HybridInputs {
  at::MemoryFormat format;
  at::Tensor prediction, variance, x0, x_t, noise, t, table;
  HybridLossArgs args;
};

HybridInputs prepare_hybrid(const Backend& backend, const at::Tensor& model_output, const at::Tensor& x0,
                            const at::Tensor& x_t, const at::Tensor& noise, const at::Tensor& t,
                            const at::Tensor& alphas_cumprod, int64_t prediction_type, int64_t variance_type) {
  check_float("x0", x0);
  check_prediction_type(prediction_type);
  check_variance_type(variance_type);
  TORCH_CHECK(is_learned(variance_type),
              "variance_type: the hybrid loss needs 2 (learned_range) or 3 (learned), got ", variance_type);
  check_model_output(model_output, x0, "x0", true);
  check_like("x_t", x_t, "x0", x0);
  check_like("noise", noise, "x0", x0);
  check_table(alphas_cumprod, x0, 2);
  check_timesteps(backend, "t", t, x0, alphas_cumprod.size(0), false);
  HybridInputs in;
  in.format = kernel_format(x0);
  const auto parts = split_model_output(model_output, x0.size(1), true, in.format);
  in.prediction = parts.first;
  in.variance = parts.second;
  in.x0 = dense_rows(x0, in.format);
  in.x_t = dense_rows(x_t, in.format);
  in.noise = dense_rows(noise, in.format);
  in.t = t.contiguous();
  in.table = alphas_cumprod.contiguous();
  HybridLossArgs& a = in.args;
  a = HybridLossArgs{};
  a.dtype = dtype_of(x0);
  a.batch = x0.size(0);
  a.inner = inner_numel(x0);
  a.prediction = rows_of(in.prediction);
  a.variance = rows_of(in.variance);
  a.x0 = rows_of(in.x0);
  a.x_t = rows_of(in.x_t);
  a.noise = rows_of(in.noise);
  a.t = in.t.data_ptr<int64_t>();
  a.alphas_cumprod = in.table.data_ptr<double>();
  a.num_timesteps = in.table.numel();
  a.prediction_type = (int)prediction_type;
  a.variance_type = (int)variance_type;
  return in;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> hybrid_loss_impl(const Backend& backend, const at::Tensor& model_output,
                                                    const at::Tensor& x0, const at::Tensor& x_t,
                                                    const at::Tensor& noise, const at::Tensor& t,
                                                    const at::Tensor& alphas_cumprod, int64_t prediction_type,
                                                    int64_t variance_type) {
  HybridInputs in = prepare_hybrid(backend, model_output, x0, x_t, noise, t, alphas_cumprod, prediction_type,
                                   variance_type);
  const auto options = x0.options().dtype(compute_dtype(x0));
  at::Tensor mse = at::empty({x0.size(0)}, options), vb = at::empty({x0.size(0)}, options);
  if (x0.size(0) == 0) return {mse, vb};
  in.args.mse = mse.data_ptr();
  in.args.vb = vb.data_ptr();
  backend.hybrid_loss_forward(in.args);
  return {mse, vb};
}

at::Tensor hybrid_loss_backward_impl(const Backend& backend, const at::Tensor& grad_mse, const at::Tensor& grad_vb,
                                     const at::Tensor& model_output, const at::Tensor& x0, const at::Tensor& x_t,
                                     const at::Tensor& noise, const at::Tensor& t, const at::Tensor& alphas_cumprod,
                                     int64_t prediction_type, int64_t variance_type) {
  HybridInputs in = prepare_hybrid(backend, model_output, x0, x_t, noise, t, alphas_cumprod, prediction_type,
                                   variance_type);
  const auto acc = compute_dtype(x0);
  const std::vector<int64_t> batch_shape{x0.size(0)};
  for (const auto& g : {std::make_pair("grad_mse", &grad_mse), std::make_pair("grad_vb", &grad_vb)}) {
    TORCH_CHECK(g.second->sizes() == at::IntArrayRef(batch_shape), g.first, ": expected shape (", x0.size(0),
                ",), got ", g.second->sizes());
    check_device(g.first, *g.second, "x0", x0);
  }
  const at::Tensor gm = grad_mse.to(acc).contiguous(), gv = grad_vb.to(acc).contiguous();
  const int64_t channels = x0.size(1);
  const auto out_format = kernel_format(model_output);
  const bool direct = in.format == at::MemoryFormat::Contiguous && out_format == at::MemoryFormat::Contiguous;
  at::Tensor grad, grad_pred, grad_var;
  if (direct) {
    grad = at::empty(model_output.sizes(), model_output.options());
    grad_pred = grad.narrow(1, 0, channels);
    grad_var = grad.narrow(1, channels, channels);
  } else {
    grad_pred = at::empty(x0.sizes(), model_output.options().memory_format(in.format));
    grad_var = at::empty(x0.sizes(), model_output.options().memory_format(in.format));
  }
  if (x0.numel() > 0) {
    in.args.grad_mse = gm.data_ptr();
    in.args.grad_vb = gv.data_ptr();
    in.args.grad_prediction = out_rows_of(grad_pred);
    in.args.grad_variance = out_rows_of(grad_var);
    backend.hybrid_loss_backward(in.args);
  }
  if (direct) return grad;
  return at::cat({grad_pred, grad_var}, 1).contiguous(out_format);
}

namespace {

// weight / bias ([C]) and scale / shift ([B, C]): absent, or of that shape in float32 or x's dtype on x's device;
// returned dense in the compute dtype (an undefined tensor when absent).
at::Tensor group_norm_param(const char* name, const c10::optional<at::Tensor>& param, at::IntArrayRef shape,
                            const char* shape_text, const at::Tensor& x) {
  if (!param.has_value() || !param->defined()) return at::Tensor();
  const at::Tensor& p = *param;
  TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == x.scalar_type(), name,
              ": expected dtype float32 or ", x.scalar_type(), " (that of x), got ", p.scalar_type());
  TORCH_CHECK(p.sizes() == shape, name, ": expected shape ", shape, " (", shape_text, "), got ", p.sizes());
  check_device(name, p, "x", x);
  return p.to(compute_dtype(x)).contiguous();
}

}  // namespace

at::Tensor group_norm_act_impl(const Backend& backend, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias, int64_t num_groups, double eps,
                               const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
                               bool silu) {
  check_float("x", x);
  TORCH_CHECK(x.dim() >= 2, "x: expected a tensor [B, C, *spatial] with at least 2 dimensions, got shape ",
              x.sizes());
  const int64_t batch = x.size(0), channels = x.size(1);
  TORCH_CHECK(num_groups >= 1 && channels % num_groups == 0, "num_groups: expected a positive divisor of the ",
              channels, " channels of x, got ", num_groups);
  TORCH_CHECK(eps > 0.0 && std::isfinite(eps), "eps: expected a finite float > 0, got ", eps);
  const std::vector<int64_t> per_channel{channels}, per_sample{batch, channels};
  const at::Tensor w = group_norm_param("weight", weight, per_channel, "[C], C = x.shape[1]", x);
  const at::Tensor b = group_norm_param("bias", bias, per_channel, "[C], C = x.shape[1]", x);
  const at::Tensor sc = group_norm_param("scale", scale, per_sample, "[B, C] of x", x);
  const at::Tensor sh = group_norm_param("shift", shift, per_sample, "[B, C] of x", x);
  const auto format = kernel_format(x);
  const at::Tensor xd = x.contiguous(format);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(format));
  if (out.numel() == 0) return out;
  at::Tensor workspace;
  if (backend.group_norm_needs_workspace) {
    workspace = at::empty({batch * channels * kGroupNormWorkDoubles}, x.options().dtype(at::kDouble));
  }
  GroupNormArgs args{dtype_of(x), batch, channels, num_groups, inner_numel(x) / channels,
                     format == at::MemoryFormat::ChannelsLast, eps, silu, xd.data_ptr(),
                     w.defined() ? w.data_ptr() : nullptr, b.defined() ? b.data_ptr() : nullptr,
                     sc.defined() ? sc.data_ptr() : nullptr, sh.defined() ? sh.data_ptr() : nullptr,
                     out.data_ptr(), workspace.defined() ? workspace.data_ptr<double>() : nullptr};
  backend.group_norm_act(args);
  return out;
}

// ---- attention_qkv ----

at::Tensor attention_qkv_impl(const Backend& backend, const at::Tensor& qkv, int64_t num_heads) {
  check_float("qkv", qkv);
  TORCH_CHECK(qkv.dim() == 3, "qkv: expected a tensor [B, T, 3 * C] with 3 dimensions, got shape ", qkv.sizes());
  TORCH_CHECK(num_heads >= 1, "num_heads: expected an int >= 1, got ", num_heads);
  const int64_t features = qkv.size(2);
  TORCH_CHECK(features > 0 && features % (3 * num_heads) == 0, "qkv: expected a last dimension 3 * C with C >= 1 "
              "a multiple of num_heads = ", num_heads, ", got ", features);
  const int64_t batch = qkv.size(0), tokens = qkv.size(1), channels = features / 3;
  // the kernels need dense features; batch and token strides may be anything
  const at::Tensor q = qkv.stride(2) == 1 ? qkv : qkv.contiguous();
  at::Tensor out = at::empty({batch, tokens, channels}, qkv.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  AttentionArgs args{dtype_of(qkv), batch, tokens, num_heads, channels / num_heads, q.data_ptr(),
                     q.stride(0), q.stride(1), out.data_ptr()};
  backend.attention_qkv(args);
  return out;
}

}  // namespace diffcore

// ---- schemas (one block, from op_list.h); the CPU registration is in cpu/ops_cpu.cpp ----

TORCH_LIBRARY(diffcore, m) {
#define DIFFCORE_DEF_OP(name, schema) m.def(#name schema);
  DIFFCORE_FOR_EACH_OP(DIFFCORE_DEF_OP)
#undef DIFFCORE_DEF_OP
}
