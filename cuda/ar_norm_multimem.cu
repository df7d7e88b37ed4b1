// Fused AllReduce + residual-add + RMSNorm with NVLS multimem instructions (TokenWeave's kernel for
// Hopper/Blackwell with NVSwitch). COMPILED AND PTX-CHECKED ONLY: never run it on the lab machines
// (docs/design.md#rules, Rule 1); tw/comm/multimem.py refuses to set it up unless explicitly allowed.
//
// WHAT IT COMPUTES. Staging buffers S_r [max_tokens, H] bf16 of all TP ranks are bound to one
// multicast object; `mc_stage` is this rank's multicast address of the staging rows, `mc_out` that of
// the output rows, `mc_signal` that of the signal pad. For the rows [lo, hi) = owned_rows(start, end,
// rank, tp) (tw/comm/__init__.py):
//   s = multimem.ld_reduce(mc_stage[row])     the switch sums the row over all ranks (fp32 accumulate)
//   h = s + residual[row]; residual[row] = bf16(h)
//   y = bf16(h * rsqrt(mean(h^2) + eps) * weight)
//   multimem.st(mc_out[row], y)               the switch writes y into every rank's output row
// So one kernel does ReduceScatter -> add + RMSNorm on 1/TP of the rows -> AllGather, and the SMs only
// issue 16-byte loads/stores: the reduction and the fan-out happen in the NVSwitch.
//
// LAUNCH SHAPE. grid = ctas (the CTA budget, same on every rank), block = ceil(H/8/VPT) threads (<= 512),
// VPT = 16-byte vectors per thread per row (compile-time, 1/2/4). CTA c handles rows slice c of [lo, hi).
//
// MEMORY ORDERING. Entry barrier: the staging rows of every rank must be complete before any rank
// ld_reduces them. CTA c's thread 0 does multimem.red.release.sys.add(mc_signal[0][c], 1) (one add
// lands on every rank's pad) and then spins with ld.acquire.sys on its LOCAL pad until it reads
// epoch * tp. Release on the add + acquire on the read order every rank's earlier writes (its GEMM,
// completed in stream order before this kernel) before our ld_reduce. Exit barrier: the same on
// mc_signal[1][c] after the multimem.st's (release orders them before the add); it guarantees that when this kernel returns, every rank's stores into our output rows have landed,
// and that no rank starts overwriting its staging (next GEMM) while a peer still ld_reduces it.
// Pads are counters that only grow (epoch * tp); the epoch is a device counter bumped by the last CTA.
// Slot c counts one arrival per rank per call, so a MultimemComm uses ONE CTA count for all its calls.
// Spins are bounded by timeout_ns (globaltimer); on timeout state[2] is set and the kernel returns.
// The acquire load, the bounded spin (tw::sync::wait_flag, polling every spin here), the error record
// and the call epoch (read_call_epoch / finish_call) are shared with the P2P kernel in
// cuda/peer_sync.cuh, whose header comment gives their ordering argument; only the multimem
// instructions are defined in this file.
#include "common.cuh"
#include "peer_sync.cuh"

namespace {

TW_DEVICE void multimem_red_release_add(unsigned int* mc, unsigned int v) {
  asm volatile("multimem.red.release.sys.global.add.u32 [%0], %1;" ::"l"(mc), "r"(v) : "memory");
}

// 8 bf16 values summed over all ranks by the switch, accumulated in fp32, returned as 4 x bf16x2.
TW_DEVICE uint4 multimem_ld_reduce_bf16x8(const void* mc) {
  uint4 v;
  asm volatile("multimem.ld_reduce.relaxed.sys.global.add.acc::f32.v4.bf16x2 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(mc)
               : "memory");
  return v;
}

// 16 bytes (8 bf16 reinterpreted as 4 f32) written into every rank's copy of the row.
TW_DEVICE void multimem_st_16b(void* mc, const uint4& v) {
  asm volatile("multimem.st.relaxed.sys.global.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(mc),
               "f"(__uint_as_float(v.x)), "f"(__uint_as_float(v.y)), "f"(__uint_as_float(v.z)),
               "f"(__uint_as_float(v.w))
               : "memory");
}

TW_DEVICE bool barrier(unsigned int* mc_pad, unsigned int* local_pad, unsigned int target,
                       unsigned long long timeout_ns, unsigned int* state, int phase) {
  __shared__ int s_fail;
  __syncthreads();
  if (threadIdx.x == 0) {
    s_fail = 0;
    multimem_red_release_add(mc_pad, 1u);
    // Aborted (another CTA failed) or timed out: one handling for both (the claim fails when aborted).
    if (!tw::sync::wait_flag<1>(local_pad, target, timeout_ns, state)) {
      if (tw::sync::claim_error(state)) {
        state[tw::sync::kStateCta] = blockIdx.x;
        state[tw::sync::kStatePhase] = phase;
      }
      s_fail = 1;
    }
  }
  __syncthreads();
  return s_fail == 0;
}

template <int VPT>
__device__ void run(__nv_bfloat16* mc_stage, __nv_bfloat16* mc_out, unsigned int* mc_signal,
                    unsigned int* local_signal, int rank, int tp, int hidden, int start, int end,
                    __nv_bfloat16* residual, const __nv_bfloat16* weight, float eps,
                    unsigned long long timeout_ns, unsigned int* state) {
  __shared__ float scratch[32];
  __shared__ unsigned int s_epoch;
  const unsigned int epoch = tw::sync::read_call_epoch(state, s_epoch);
  const int c = blockIdx.x, H8 = hidden / 8;
  if (!barrier(mc_signal + c, local_signal + c, epoch * tp, timeout_ns, state, 0)) return;

  const int chunk = (end - start + tp - 1) / tp;
  const int lo = min(end, start + rank * chunk), hi = min(end, lo + chunk);
  const int n = hi - lo, base = n / gridDim.x, rem = n % gridDim.x;
  const int a = lo + c * base + min(c, rem), b = a + base + (c < rem ? 1 : 0);
  for (int row = a; row < b; ++row) {
    float h[VPT][8];
    float ss = 0.f;
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
      const int col = threadIdx.x + v * blockDim.x;
      if (col >= H8) continue;
      const long long off = (long long)row * hidden + col * 8;
      float s[8], r[8];
      tw::unpack8(multimem_ld_reduce_bf16x8(mc_stage + off), s);
      tw::load8(residual + off, r);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        h[v][e] = s[e] + r[e];
        ss += h[v][e] * h[v][e];
      }
      tw::store8(residual + off, h[v]);
    }
    const float rinv = rsqrtf(tw::block_sum(ss, scratch) / hidden + eps);
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
      const int col = threadIdx.x + v * blockDim.x;
      if (col >= H8) continue;
      float w[8], y[8];
      tw::load8(weight + col * 8, w);
#pragma unroll
      for (int e = 0; e < 8; ++e) y[e] = h[v][e] * rinv * w[e];
      multimem_st_16b(mc_out + (long long)row * hidden + col * 8, tw::pack8(y));
    }
  }
  if (!barrier(mc_signal + gridDim.x + c, local_signal + gridDim.x + c, epoch * tp, timeout_ns, state, 1)) return;
  tw::sync::finish_call(state, epoch);
}

}  // namespace

// Signal pads: [2 phases][gridDim.x] uint32 counters; every call must use the same CTA count
// (the pads count arrivals per CTA slot).
#define TW_MM_KERNEL(VPT)                                                                                 \
  extern "C" __global__ void __launch_bounds__(512) multimem_ar_norm_v##VPT(                             \
      __nv_bfloat16* mc_stage, __nv_bfloat16* mc_out, unsigned int* mc_signal, unsigned int* local_signal, \
      int rank, int tp, int hidden, int start, int end, __nv_bfloat16* residual,                           \
      const __nv_bfloat16* weight, float eps, unsigned long long timeout_ns, unsigned int* state) {       \
    run<VPT>(mc_stage, mc_out, mc_signal, local_signal, rank, tp, hidden, start, end, residual, weight,   \
             eps, timeout_ns, state);                                                                     \
  }
TW_MM_KERNEL(1)
TW_MM_KERNEL(2)
TW_MM_KERNEL(4)
