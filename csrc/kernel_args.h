// kernel_args.h: plain argument structs handed from the torch bindings (csrc/ops.cpp) to the CPU kernels and the
// CUDA kernels. Torch-free, so that .cu files can include it.
//
// Every image-like tensor is seen as B rows of `inner` elements: element j of sample b sits at
// data + b * batch_stride + j (the bindings make the inner part dense, in the tensor's own layout).
#pragma once

#include <stdint.h>

namespace diffcore {

// Values shared with diffcore/types.py.
enum PredictionType : int { kPredEps = 0, kPredX0 = 1, kPredV = 2 };
enum VarianceType : int { kFixedSmall = 0, kFixedLarge = 1, kLearnedRange = 2, kLearned = 3 };

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

struct Rows {
  const void* data;
  int64_t batch_stride;  // elements
};

struct OutRows {
  void* data;
  int64_t batch_stride;  // elements
};

struct Noise {
  Rows given;         // given.data == nullptr: draw in-kernel from Philox(seed, offset)
  uint64_t seed;
  uint64_t offset;
  uint64_t first_row;  // row b is image first_row + b of the seed's numbering (philox_normal4)
};

struct QSampleArgs {
  DType dtype;
  int64_t batch, inner;
  Rows x0, noise;
  const int64_t* t;
  const double* alphas_cumprod;
  int64_t num_timesteps;  // T, the table's length: kernels clamp timesteps into range before indexing
  OutRows out;
};

struct DdimStepArgs {
  DType dtype;
  int64_t batch, inner;
  Rows x, model_output;
  const int64_t* t;
  const int64_t* t_prev;
  const double* alphas_cumprod;
  int64_t num_timesteps;  // T, the table's length: kernels clamp timesteps into range before indexing
  double eta;
  int prediction_type;
  bool clip_denoised;
  Noise noise;
  OutRows x_prev, pred_x0;
};

struct DdpmStepArgs {
  DType dtype;
  int64_t batch, inner;
  Rows x, prediction, variance;  // variance.data == nullptr for the fixed variance types
  const int64_t* t;
  const double* alphas_cumprod;
  int64_t num_timesteps;  // T, the table's length: kernels clamp timesteps into range before indexing
  int prediction_type, variance_type;
  bool clip_denoised;
  Noise noise;
  OutRows x_prev, pred_x0;
};

struct HybridLossArgs {
  DType dtype;
  int64_t batch, inner;
  Rows prediction, variance, x0, x_t, noise;
  const int64_t* t;
  const double* alphas_cumprod;
  int64_t num_timesteps;  // T, the table's length: kernels clamp timesteps into range before indexing
  int prediction_type, variance_type;
  // forward: per-sample means (compute dtype: float, or double for float64 inputs)
  void* mse;
  void* vb;
  // backward (grad_mse/grad_vb in the compute dtype, [B]); grad_prediction/grad_variance rows
  const void* grad_mse;
  const void* grad_vb;
  OutRows grad_prediction, grad_variance;
};

// group_norm_act: x is B images of C channels and S = prod(spatial) positions, dense in one of two layouts:
// NCHW (element (b, c, p) at b*C*S + c*S + p) or channels_last (at b*S*C + p*C + c). weight, bias ([C]) and
// scale, shift ([B, C], row-major) are in the compute type (float, or double for float64 x) or null (absent).
// y = (x - mean_bg) * rstd_bg * weight_c + bias_c; y = y * (1 + scale_bc) + shift_bc; y = silu(y) when silu.
struct GroupNormArgs {
  DType dtype;
  int64_t batch, channels, groups, spatial;
  bool channels_last;
  double eps;
  bool silu;
  const void* x;
  const void* weight;
  const void* bias;
  const void* scale;
  const void* shift;
  void* out;
  // CPU kernels only: batch * channels * kGroupNormWorkDoubles doubles of scratch (per-channel sums and
  // coefficients); null for CUDA.
  double* workspace;
};

constexpr int64_t kGroupNormWorkDoubles = 5;

// attention_qkv: B sequences of T tokens; token t of sequence b holds 3 C features (q | k | v, each H heads of
// d = C / H channels) at qkv + b * batch_stride + t * token_stride (the features dense). out is [B, T, C]
// contiguous: out[b, i, h d + c] = sum_j softmax_j(q_bhi . k_bhj / sqrt(d)) v_bhj[c].
struct AttentionArgs {
  DType dtype;
  int64_t batch, tokens, heads, head_dim;
  const void* qkv;
  int64_t batch_stride, token_stride;  // elements
  void* out;
};

}  // namespace diffcore
