// kernels.cu: the CUDA kernels of the fused ops. No torch header: the binding (ops_cuda.cpp) hands over raw
// pointers, row strides and the current stream. What a thread computes lives in kernel_ops.cuh (host-device, also
// run by the host emulator in tests/cuda_emu); the formulas live in diffcore_math.h.
//
// Kernels: one block per tile (one sample's `threads * kItemsPerThread` consecutive items), a 64-bit grid-stride
// loop over tiles (a grid is at most 2^31 - 1 blocks; normally one tile per block). Thread 0 computes the
// sample's coefficients in double into shared memory while every thread's first 16-byte loads are in flight.
//
// Hybrid loss forward, deterministic without atomics: each block reduces its tile (per-thread double sums, a
// fixed warp-shuffle tree, then warp 0 over the warps) and writes either the final mean (when a row is one tile,
// i.e. inner <= 4096 float / 8192 half elements: one launch for CIFAR-size images) or a partial sum per
// (sample, tile) into the workspace, which a second small kernel sums per sample in a fixed order (one warp per
// sample). The result depends only on (dtype, batch, inner), never on scheduling.
#include "cuda/kernels.h"

#include "cuda/kernel_ops.cuh"

namespace diffcore {
namespace cuda {
namespace {

constexpr int64_t kMaxGrid = 2147483647;  // gridDim.x limit

unsigned int grid_for(int64_t blocks) { return (unsigned int)(blocks < kMaxGrid ? blocks : kMaxGrid); }

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;  // complete in lane 0
}

template <bool VEC, typename Op>
__global__ void __launch_bounds__(kMaxThreads) elementwise_kernel(const Op op, const TileShape s) {
  __shared__ typename Op::Coeffs coeffs;
  for (int64_t tile = blockIdx.x; tile < s.num_tiles; tile += gridDim.x) {
    typename Op::Input first;
    tile_prefetch<VEC>(op, s, tile, (int)threadIdx.x, first);  // loads in flight while thread 0 works
    if (threadIdx.x == 0) coeffs = op.coeffs(tile_sample(s, tile));
    __syncthreads();
    typename Op::Sums sums{};
    tile_process<VEC>(op, s, tile, (int)threadIdx.x, coeffs, first, sums);
    __syncthreads();  // everyone has read coeffs before the next tile overwrites them
  }
}

template <bool VEC, typename Op>
__global__ void __launch_bounds__(kMaxThreads)
    hybrid_forward_kernel(const Op op, const TileShape s, double* partials, typename Op::acc_t* mse,
                          typename Op::acc_t* vb) {
  __shared__ typename Op::Coeffs coeffs;
  __shared__ double warp_sq[kMaxThreads / 32], warp_vb[kMaxThreads / 32];
  const int lane = (int)(threadIdx.x & 31), warp = (int)(threadIdx.x >> 5);
  for (int64_t tile = blockIdx.x; tile < s.num_tiles; tile += gridDim.x) {
    typename Op::Input first;
    tile_prefetch<VEC>(op, s, tile, (int)threadIdx.x, first);  // loads in flight while thread 0 works
    if (threadIdx.x == 0) coeffs = op.coeffs(tile_sample(s, tile));
    __syncthreads();
    LossSums sums{0.0, 0.0};
    tile_process<VEC>(op, s, tile, (int)threadIdx.x, coeffs, first, sums);
    const double sq = warp_sum(sums.sq), v = warp_sum(sums.vb);
    if (lane == 0) {
      warp_sq[warp] = sq;
      warp_vb[warp] = v;
    }
    __syncthreads();
    if (warp == 0) {
      const int warps = (int)(blockDim.x >> 5);
      const double block_sq = warp_sum(lane < warps ? warp_sq[lane] : 0.0);
      const double block_vb = warp_sum(lane < warps ? warp_vb[lane] : 0.0);
      if (lane == 0) {
        if (partials != nullptr) {
          partials[2 * tile] = block_sq;
          partials[2 * tile + 1] = block_vb;
        } else {  // the row is this one tile
          const int64_t b = tile_sample(s, tile);
          mse[b] = (typename Op::acc_t)(block_sq / (double)s.inner);
          vb[b] = (typename Op::acc_t)(block_vb / (double)s.inner);
        }
      }
    }
    __syncthreads();  // coeffs and the warp sums are free again
  }
}

// One warp per sample sums its tiles' partials (lane k: tiles k, k + 32, ...; then a fixed shuffle tree).
template <typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    hybrid_finalize_kernel(const double* partials, int64_t batch, int64_t tiles_per_row, int64_t inner, acc_t* mse,
                           acc_t* vb) {
  const int lane = (int)(threadIdx.x & 31);
  const int64_t warps_per_block = blockDim.x >> 5;
  for (int64_t b = (int64_t)blockIdx.x * warps_per_block + (threadIdx.x >> 5); b < batch;
       b += (int64_t)gridDim.x * warps_per_block) {
    double sq = 0.0, v = 0.0;
    for (int64_t k = lane; k < tiles_per_row; k += 32) {
      sq += partials[2 * (b * tiles_per_row + k)];
      v += partials[2 * (b * tiles_per_row + k) + 1];
    }
    sq = warp_sum(sq);
    v = warp_sum(v);
    if (lane == 0) {
      mse[b] = (acc_t)(sq / (double)inner);
      vb[b] = (acc_t)(v / (double)inner);
    }
  }
}

// ---- group_norm_act: one block per (image, group), a grid-stride loop over them ----

__device__ __forceinline__ Moments warp_merge(Moments m) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    Moments other;
    other.n = __shfl_down_sync(0xffffffffu, m.n, offset);
    other.mean = __shfl_down_sync(0xffffffffu, m.mean, offset);
    other.m2 = __shfl_down_sync(0xffffffffu, m.m2, offset);
    m = merge_moments(m, other);
  }
  return m;  // complete in lane 0
}

// Item i of group g (0 <= i < C/G * S) sits at offset group_offset(i) of the image and belongs to channel
// g C/G + i / S (NCHW: the group's planes are consecutive) or g C/G + i % (C/G) (channels_last).
struct GroupIndex {
  int64_t channels, per_group, spatial;
  bool channels_last;

  __device__ __forceinline__ int64_t channel(int64_t g, int64_t i) const {
    return g * per_group + (channels_last ? i % per_group : i / spatial);
  }
  __device__ __forceinline__ int64_t offset(int64_t g, int64_t i) const {
    return channels_last ? (i / per_group) * channels + g * per_group + i % per_group : g * per_group * spatial + i;
  }
};

template <typename scalar_t, bool SILU>
__global__ void __launch_bounds__(kMaxThreads) group_norm_act_kernel(const GroupNormArgs a) {
  using acc_t = acc_type<scalar_t>;
  __shared__ Moments warp_moments[kMaxThreads / 32];
  __shared__ GroupStats stats;
  const int lane = (int)(threadIdx.x & 31), warp = (int)(threadIdx.x >> 5);
  const GroupIndex index{a.channels, a.channels / a.groups, a.spatial, a.channels_last};
  const int64_t count = index.per_group * a.spatial;
  const acc_t* weight = static_cast<const acc_t*>(a.weight);
  const acc_t* bias = static_cast<const acc_t*>(a.bias);
  for (int64_t bg = blockIdx.x; bg < a.batch * a.groups; bg += gridDim.x) {
    const int64_t b = bg / a.groups, g = bg % a.groups;
    const scalar_t* x = static_cast<const scalar_t*>(a.x) + b * a.channels * a.spatial;
    scalar_t* out = static_cast<scalar_t*>(a.out) + b * a.channels * a.spatial;
    const acc_t* scale = a.scale ? static_cast<const acc_t*>(a.scale) + b * a.channels : nullptr;
    const acc_t* shift = a.shift ? static_cast<const acc_t*>(a.shift) + b * a.channels : nullptr;
    const acc_t pivot = to_acc<acc_t>(x[index.offset(g, 0)]);
    acc_t sum = 0, sum_sq = 0;
    int64_t n = 0;
    for (int64_t i = threadIdx.x; i < count; i += blockDim.x, ++n) {
      const acc_t v = to_acc<acc_t>(x[index.offset(g, i)]) - pivot;
      sum += v;
      sum_sq += v * v;
    }
    Moments m{0.0, 0.0, 0.0};
    if (n > 0) m = moments_from_shifted_sums((double)n, (double)pivot, (double)sum, (double)sum_sq);
    m = warp_merge(m);
    if (lane == 0) warp_moments[warp] = m;
    __syncthreads();
    if (warp == 0) {
      const int warps = (int)(blockDim.x >> 5);
      Moments mine{0.0, 0.0, 0.0};
      if (lane < warps) mine = warp_moments[lane];
      mine = warp_merge(mine);
      if (lane == 0) stats = group_stats(mine, a.eps);
    }
    __syncthreads();
    const GroupStats s = stats;
    for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
      const int64_t c = index.channel(g, i), at = index.offset(g, i);
      const GroupNormCoeffs<acc_t> k = group_norm_coeffs<acc_t>(
          s, pivot, weight ? weight[c] : (acc_t)1, bias ? bias[c] : (acc_t)0, scale ? scale[c] : (acc_t)0,
          shift ? shift[c] : (acc_t)0);
      out[at] = from_acc<scalar_t, acc_t>(group_norm_act_value<acc_t, sizeof(scalar_t) == 2>(
          SILU, k.pivot, k.a, k.d, to_acc<acc_t>(x[at])));
    }
    __syncthreads();  // stats and warp_moments are free again
  }
}

// Runs an op on the device: the Exec policy of the run_* functions in kernel_ops.cuh.
struct DeviceExec {
  cudaStream_t stream;

  template <typename Op>
  cudaError_t elementwise(const Op& op) const {
    const TileShape s = tile_shape_of(op);
    if (s.num_tiles == 0) return cudaSuccess;
    if (op.vectorizable()) {
      elementwise_kernel<true, Op><<<grid_for(s.num_tiles), s.threads, 0, stream>>>(op, s);
    } else {
      elementwise_kernel<false, Op><<<grid_for(s.num_tiles), s.threads, 0, stream>>>(op, s);
    }
    return cudaGetLastError();
  }

  template <typename Op>
  cudaError_t reduce(const Op& op, double* workspace) const {
    using acc_t = typename Op::acc_t;
    const TileShape s = tile_shape_of(op);
    if (s.num_tiles == 0) return cudaSuccess;
    acc_t* mse = static_cast<acc_t*>(op.a.mse);
    acc_t* vb = static_cast<acc_t*>(op.a.vb);
    double* partials = s.tiles_per_row > 1 ? workspace : nullptr;
    if (op.vectorizable()) {
      hybrid_forward_kernel<true, Op><<<grid_for(s.num_tiles), s.threads, 0, stream>>>(op, s, partials, mse, vb);
    } else {
      hybrid_forward_kernel<false, Op><<<grid_for(s.num_tiles), s.threads, 0, stream>>>(op, s, partials, mse, vb);
    }
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || partials == nullptr) return err;
    const int64_t warps_per_block = kMaxThreads / 32;
    const int64_t blocks = (s.batch + warps_per_block - 1) / warps_per_block;
    hybrid_finalize_kernel<acc_t><<<grid_for(blocks), kMaxThreads, 0, stream>>>(partials, s.batch, s.tiles_per_row,
                                                                                s.inner, mse, vb);
    return cudaGetLastError();
  }
};

}  // namespace

cudaError_t group_norm_act(const GroupNormArgs& args, cudaStream_t stream) {
  if (args.groups <= 0 || args.channels % args.groups != 0) return cudaErrorInvalidValue;
  const int64_t blocks = args.batch * args.groups;
  if (blocks == 0 || args.spatial == 0 || args.channels == 0) return cudaSuccess;
  return dispatch_dtype<CudaTypes>(args.dtype, [&](auto scalar_tag) {
    using scalar_t = typename decltype(scalar_tag)::type;
    if (args.silu) {
      group_norm_act_kernel<scalar_t, true><<<grid_for(blocks), kMaxThreads, 0, stream>>>(args);
    } else {
      group_norm_act_kernel<scalar_t, false><<<grid_for(blocks), kMaxThreads, 0, stream>>>(args);
    }
    return cudaGetLastError();
  });
}

cudaError_t q_sample(const QSampleArgs& args, cudaStream_t stream) { return run_q_sample(args, DeviceExec{stream}); }

cudaError_t ddim_step(const DdimStepArgs& args, cudaStream_t stream) {
  return run_ddim_step(args, DeviceExec{stream});
}

cudaError_t ddpm_step(const DdpmStepArgs& args, cudaStream_t stream) {
  return run_ddpm_step(args, DeviceExec{stream});
}

size_t hybrid_loss_forward_workspace_bytes(const HybridLossArgs& args) {
  return hybrid_loss_forward_workspace_bytes_for(args);
}

cudaError_t hybrid_loss_forward(const HybridLossArgs& args, void* workspace, cudaStream_t stream) {
  return run_hybrid_loss_forward(args, workspace, DeviceExec{stream});
}

cudaError_t hybrid_loss_backward(const HybridLossArgs& args, cudaStream_t stream) {
  return run_hybrid_loss_backward(args, DeviceExec{stream});
}

// ---- attention_qkv: one block per (sequence, head) in a grid-stride loop, one thread per query row ----
//
// Each thread keeps its query and output row in registers / local memory and runs an online softmax over the
// keys: running max m, sum l of exp(s_j - m) and weighted sum o, both rescaled by exp(m_old - m_new) when the max
// grows (0 at the first key, where m_old = -inf). NaN in a score makes m, l and o NaN (dc_max propagates it).
namespace {

constexpr int kAttnThreads = 128;

template <typename scalar_t>
__global__ void __launch_bounds__(kAttnThreads) attention_qkv_kernel(const AttentionArgs a) {
  using acc_t = acc_type<scalar_t>;
  const int64_t T = a.tokens, d = a.head_dim, C = a.heads * d;
  const acc_t scale = attention_scale<acc_t>(d);
  for (int64_t bh = blockIdx.x; bh < a.batch * a.heads; bh += gridDim.x) {
    const int64_t b = bh / a.heads, h = bh % a.heads;
    const scalar_t* seq = static_cast<const scalar_t*>(a.qkv) + b * a.batch_stride;
    scalar_t* out = static_cast<scalar_t*>(a.out) + b * T * C + h * d;
    for (int64_t i = threadIdx.x; i < T; i += blockDim.x) {
      const scalar_t* q = seq + i * a.token_stride + h * d;
      acc_t qv[kAttentionMaxHeadDim], o[kAttentionMaxHeadDim];
      for (int64_t c = 0; c < d; ++c) {
        qv[c] = to_acc<acc_t>(q[c]);
        o[c] = (acc_t)0;
      }
      acc_t m = (acc_t)-INFINITY, l = (acc_t)0;
      for (int64_t j = 0; j < T; ++j) {
        const scalar_t* k = seq + j * a.token_stride + C + h * d;
        const scalar_t* v = k + C;
        acc_t dot = (acc_t)0;
        for (int64_t c = 0; c < d; ++c) dot = attention_fma(qv[c], to_acc<acc_t>(k[c]), dot);
        const acc_t s = dot * scale;
        const acc_t m_new = dc_max(m, s);
        const acc_t correction = softmax_term(m, m_new);
        const acc_t e = softmax_term(s, m_new);
        l = l * correction + e;
        for (int64_t c = 0; c < d; ++c) o[c] = attention_fma(e, to_acc<acc_t>(v[c]), o[c] * correction);
        m = m_new;
      }
      const acc_t inv_total = (acc_t)1 / l;
      for (int64_t c = 0; c < d; ++c) out[i * C + c] = from_acc<scalar_t, acc_t>(softmax_output(o[c], inv_total));
    }
  }
}

}  // namespace

cudaError_t attention_qkv(const AttentionArgs& args, cudaStream_t stream) {
  if (args.heads <= 0 || args.head_dim <= 0 || args.head_dim > kAttentionMaxHeadDim) return cudaErrorInvalidValue;
  const int64_t blocks = args.batch * args.heads;
  if (blocks == 0 || args.tokens == 0) return cudaSuccess;
  const int threads = args.tokens < kAttnThreads ? (int)((args.tokens + 31) / 32 * 32) : kAttnThreads;
  return dispatch_dtype<CudaTypes>(args.dtype, [&](auto scalar_tag) {
    using scalar_t = typename decltype(scalar_tag)::type;
    attention_qkv_kernel<scalar_t><<<grid_for(blocks), threads, 0, stream>>>(args);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace diffcore
