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

}  // namespace cuda
}  // namespace diffcore
