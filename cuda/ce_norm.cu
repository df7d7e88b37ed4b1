// The local half of the copy-engine (CE) transport (tw/comm/ce.py, kind "ce"): reduce the partials
// that the peers' copy engines delivered, add the residual, RMSNorm. The only SM work of a CE call.
//
// WHAT IT COMPUTES (rows [row_lo, row_hi): one chunk of the rows this rank owns, owned rows starting at
// own_lo, as tw.comm.owned_rows defines them; hidden H, bf16):
//   ce_reduce_add_norm   h = P_0[row] + P_1[row] + ... + P_{tp-1}[row] + residual[row]   (fp32, in rank order)
//                        residual[row] = r = bf16(h);  out[row] = bf16(r * rsqrt(mean(r^2) + eps) * weight)
//   ce_reduce            staging[row] = bf16(P_0[row] + ... + P_{tp-1}[row])           (the all-reduce)
// where P_src[row] = staging[row] for src == rank (my own partial, read in place) and
// recv[src][row - own_lo] otherwise (src's partial of my row, copied here by src's copy engine).
// The arithmetic is cuda/row_norm.cuh's, which warp_rows<kArNorm> / warp_rows<kAllReduce> in
// cuda/ar_norm_p2p.cu also use, with the same step count (kStep): so for one TW_TP the results are
// bit-identical to the P2P transport's (tests/mpi_ce.py compares them bit for bit).
//
// LAUNCH SHAPE. grid = k CTAs (1..SM count: the caller's budget), block = kThreads = 512 (16 warps;
// tw/comm/ce.py THREADS, checked against the PTX's .maxntid by tests/test_ce.py). One warp per row: warp w
// of the grid takes rows row_lo + w, row_lo + w + (all warps), ...; lane l takes the 16-byte columns
// l, l + 32, ... of its row, in two passes (a row is too long for a warp's registers):
//   pass 1: h in fp32, residual <- bf16(h), sum of squares of bf16(h);
//   pass 2: the lane reads back its own residual columns (its own stores: program order makes them visible)
//           and the weight, y = bf16(h) * rinv * w.
// hidden % 8 == 0 and 16-byte aligned rows are checked in Python before any launch.
//
// NO CROSS-GPU TRAFFIC. This kernel reads and writes only this GPU's memory and never waits for anything,
// so the CTA count need not match across ranks. All ordering with the other ranks is done on the host
// side by stream memory operations around the launch (tw/comm/ce.py, whose header gives the argument):
// the launch is stream-ordered after cuStreamWaitValue32 on every peer's "ready[src][chunk]" flag of this
// chunk (a peer writes that flag with cuStreamWriteValue32, whose default memory barrier orders its copy's
// writes before the flag), and the "gathered" flags this rank sets after its last kernel of the call are
// what every peer waits for before its next call can write into recv again.
#include "common.cuh"
#include "peer_layout.cuh"
#include "row_norm.cuh"

// TW_TP: the TP degree as a compile-time constant (tw/comm/ce.py compiles with -DTW_TP=<tp>, as
// P2PComm does, so the loops over ranks unroll); 0 = read it from the arguments at run time.
#ifndef TW_TP
#define TW_TP 0
#endif

namespace {

using tw::p2p::kMaxTp;    // one source with the P2P kernels and tw/comm/layout.py (MAX_TP, THREADS)
using tw::p2p::kThreads;
constexpr int kStep = tw::rownorm::step_for_tp(TW_TP);  // as in cuda/ar_norm_p2p.cu: part of the arithmetic
constexpr int kSources = TW_TP > 0 ? TW_TP : kMaxTp;  // compile-time bound on the sources

struct Args {
  __nv_bfloat16* staging;      // my staging buffer [max_tokens, H] (base)
  const __nv_bfloat16* recv;   // my recv buffer [tp][chunk_max, H] (base)
  __nv_bfloat16* residual;     // [>= row_hi, H], indexed by absolute row
  const __nv_bfloat16* weight; // [H]
  __nv_bfloat16* out;          // [>= row_hi, H], indexed by absolute row (the registered out)
  int rank, tp, hidden, row_lo, row_hi, own_lo, chunk_max;
  float eps;
};

TW_DEVICE int tp_of(const Args& a) { return TW_TP > 0 ? TW_TP : a.tp; }

// One step of pass 1 for columns c0, c0 + 32, ... (N of them): returns the sum of squares of bf16(h).
template <bool kNorm, int N>
TW_DEVICE float pass1_step(const uint4* const (&src)[kSources], int num_src, uint4* res_row, uint4* stage_row, int c0) {
  uint4 raw[kSources][N], rr[N];
#pragma unroll
  for (int s = 0; s < N; ++s) {
#pragma unroll
    for (int k = 0; k < kSources; ++k)
      if (k < num_src) raw[k][s] = src[k][c0 + 32 * s];
    if (kNorm) rr[s] = res_row[c0 + 32 * s];
  }
  float ss = 0.f;
#pragma unroll
  for (int s = 0; s < N; ++s) {
    const int col = c0 + 32 * s;
    float acc[8];
    tw::rownorm::sum_sources<kSources, N>(raw, s, num_src, acc);
    if (!kNorm) {
      stage_row[col] = tw::pack8(acc);  // in place: this lane loaded this vector above
      continue;
    }
    res_row[col] = tw::rownorm::add_residual(acc, rr[s], ss);
  }
  return ss;
}

// One step of pass 2 for N columns: y = r * rinv * w from the residual row r this lane just stored.
template <int N>
TW_DEVICE void pass2_step(const uint4* w_vec, const uint4* res_row, uint4* out_row, int c0, float rinv) {
  uint4 hv[N], wv[N];
#pragma unroll
  for (int s = 0; s < N; ++s) {
    hv[s] = res_row[c0 + 32 * s];
    wv[s] = __ldg(w_vec + c0 + 32 * s);
  }
#pragma unroll
  for (int s = 0; s < N; ++s) out_row[c0 + 32 * s] = tw::rownorm::scale(hv[s], wv[s], rinv);
}

template <bool kNorm>
__device__ void rows(const Args& a) {
  const int lane = threadIdx.x & 31;
  const int warps = gridDim.x * (blockDim.x >> 5), warp = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int H8 = a.hidden / 8, num_src = tp_of(a);
  const int full = H8 / (32 * kStep) * (32 * kStep);  // columns covered by whole steps of every lane
  const long long H = a.hidden;
  const uint4* w_vec = reinterpret_cast<const uint4*>(a.weight);
  for (int row = a.row_lo + warp; row < a.row_hi; row += warps) {
    const uint4* src[kSources];
#pragma unroll
    for (int k = 0; k < kSources; ++k) {
      const __nv_bfloat16* p = nullptr;
      if (k < num_src)
        p = k == a.rank ? a.staging + row * H : a.recv + ((long long)k * a.chunk_max + (row - a.own_lo)) * H;
      src[k] = reinterpret_cast<const uint4*>(p);
    }
    uint4* stage_row = reinterpret_cast<uint4*>(a.staging + row * H);
    uint4* res_row = kNorm ? reinterpret_cast<uint4*>(a.residual + row * H) : nullptr;
    float ss = 0.f;
    for (int c0 = lane; c0 < full; c0 += 32 * kStep) ss += pass1_step<kNorm, kStep>(src, num_src, res_row, stage_row, c0);
    for (int c0 = full + lane; c0 < H8; c0 += 32) ss += pass1_step<kNorm, 1>(src, num_src, res_row, stage_row, c0);
    if (!kNorm) continue;
    const float rinv = rsqrtf(tw::warp_sum(ss) / a.hidden + a.eps);
    uint4* out_row = reinterpret_cast<uint4*>(a.out + row * H);
    for (int c0 = lane; c0 < full; c0 += 32 * kStep) pass2_step<kStep>(w_vec, res_row, out_row, c0, rinv);
    for (int c0 = full + lane; c0 < H8; c0 += 32) pass2_step<1>(w_vec, res_row, out_row, c0, rinv);
  }
}

}  // namespace

#define TW_CE_PARAMS                                                                                     \
  __nv_bfloat16 *staging, const __nv_bfloat16 *recv, __nv_bfloat16 *residual, const __nv_bfloat16 *weight, \
      __nv_bfloat16 *out, int rank, int tp, int hidden, int row_lo, int row_hi, int own_lo, int chunk_max, float eps
#define TW_CE_ARGS \
  Args { staging, recv, residual, weight, out, rank, tp, hidden, row_lo, row_hi, own_lo, chunk_max, eps }

// residual, weight, out and eps are unused by ce_reduce (pass 0); both take the same parameters.
extern "C" __global__ void __launch_bounds__(kThreads, 1) ce_reduce_add_norm(TW_CE_PARAMS) { rows<true>(TW_CE_ARGS); }
extern "C" __global__ void __launch_bounds__(kThreads, 1) ce_reduce(TW_CE_PARAMS) { rows<false>(TW_CE_ARGS); }
