// emulator.cpp: runs what each CUDA thread does in the fused ops (csrc/cuda/kernel_ops.cuh: the same dispatch,
// tile shapes, vectorized / scalar paths, Philox grouping and reduction layout as csrc/cuda/kernels.cu) on the
// host, one block after the other and one thread after the other, so that tests/test_cuda_emulation.py can hold
// the CUDA kernels' logic against the CPU kernels on a machine without a GPU.
//
// Built by that test with the host compiler (no nvcc needed, only the CUDA headers for __half / __nv_bfloat16).
// Not emulated: anything the GPU alone decides (barriers and shared-memory races, warp shuffles, device libm).
#include <stddef.h>

#include "cuda/kernel_ops.cuh"

using namespace diffcore;
using namespace diffcore::cuda;

namespace {

int g_last_vectorized = -1;  // the path the last op took: 1 vectorized, 0 scalar

// One tile per "block": the coefficients (thread 0 in the kernel), then every thread's prefetch + process.
template <bool VEC, typename Op>
LossSums run_tile(const Op& op, const TileShape& s, int64_t tile) {
  const typename Op::Coeffs coeffs = op.coeffs(tile_sample(s, tile));
  LossSums total{0.0, 0.0};
  for (int thread = 0; thread < s.threads; ++thread) {
    typename Op::Input first;
    tile_prefetch<VEC>(op, s, tile, thread, first);
    typename Op::Sums sums{};
    tile_process<VEC>(op, s, tile, thread, coeffs, first, sums);
    if constexpr (std::is_same<typename Op::Sums, LossSums>::value) {
      total.sq += sums.sq;
      total.vb += sums.vb;
    }
  }
  return total;
}

struct HostExec {
  template <typename Op>
  cudaError_t elementwise(const Op& op) const {
    const TileShape s = tile_shape_of(op);
    g_last_vectorized = op.vectorizable() ? 1 : 0;
    for (int64_t tile = 0; tile < s.num_tiles; ++tile) {
      if (g_last_vectorized) {
        run_tile<true>(op, s, tile);
      } else {
        run_tile<false>(op, s, tile);
      }
    }
    return cudaSuccess;
  }

  template <typename Op>
  cudaError_t reduce(const Op& op, double* workspace) const {
    using acc_t = typename Op::acc_t;
    const TileShape s = tile_shape_of(op);
    g_last_vectorized = op.vectorizable() ? 1 : 0;
    acc_t* mse = static_cast<acc_t*>(op.a.mse);
    acc_t* vb = static_cast<acc_t*>(op.a.vb);
    for (int64_t tile = 0; tile < s.num_tiles; ++tile) {
      const LossSums sums = g_last_vectorized ? run_tile<true>(op, s, tile) : run_tile<false>(op, s, tile);
      if (s.tiles_per_row > 1) {
        workspace[2 * tile] = sums.sq;
        workspace[2 * tile + 1] = sums.vb;
      } else {
        mse[tile] = (acc_t)(sums.sq / (double)s.inner);
        vb[tile] = (acc_t)(sums.vb / (double)s.inner);
      }
    }
    if (s.tiles_per_row > 1) {
      for (int64_t b = 0; b < s.batch; ++b) {
        double sq = 0.0, v = 0.0;
        for (int64_t k = 0; k < s.tiles_per_row; ++k) {
          sq += workspace[2 * (b * s.tiles_per_row + k)];
          v += workspace[2 * (b * s.tiles_per_row + k) + 1];
        }
        mse[b] = (acc_t)(sq / (double)s.inner);
        vb[b] = (acc_t)(v / (double)s.inner);
      }
    }
    return cudaSuccess;
  }
};

}  // namespace

extern "C" {

int emu_q_sample(const QSampleArgs* a) { return (int)run_q_sample(*a, HostExec{}); }
int emu_ddim_step(const DdimStepArgs* a) { return (int)run_ddim_step(*a, HostExec{}); }
int emu_ddpm_step(const DdpmStepArgs* a) { return (int)run_ddpm_step(*a, HostExec{}); }
size_t emu_hybrid_workspace_bytes(const HybridLossArgs* a) { return hybrid_loss_forward_workspace_bytes_for(*a); }
int emu_hybrid_loss_forward(const HybridLossArgs* a, void* workspace) {
  return (int)run_hybrid_loss_forward(*a, workspace, HostExec{});
}
int emu_hybrid_loss_backward(const HybridLossArgs* a) { return (int)run_hybrid_loss_backward(*a, HostExec{}); }
int emu_last_vectorized() { return g_last_vectorized; }

// Layout checks for the ctypes mirror of kernel_args.h.
size_t emu_sizeof(int which) {
  switch (which) {
    case 0: return sizeof(QSampleArgs);
    case 1: return sizeof(DdimStepArgs);
    case 2: return sizeof(DdpmStepArgs);
    case 3: return sizeof(HybridLossArgs);
    case 4: return offsetof(DdimStepArgs, noise);
    case 5: return offsetof(DdpmStepArgs, x_prev);
    case 6: return offsetof(HybridLossArgs, grad_prediction);
    case 7: return offsetof(QSampleArgs, out);
  }
  return 0;
}

// The tile shape the kernels use for (batch, inner, kVec): threads, tiles per row.
void emu_tile_shape(int64_t batch, int64_t inner, int vec, int64_t* out) {
  const TileShape s = make_tile_shape(batch, inner, vec);
  out[0] = s.threads;
  out[1] = s.tiles_per_row;
  out[2] = s.num_tiles;
}

}  // extern "C"
