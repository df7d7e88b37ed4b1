// Per-SM copy rate: how fast k CTAs move bytes through local HBM with 16-byte loads and stores
// (experiments/sm_rate.py). Every SM-based comm kernel (cuda/ar_norm_p2p.cu) moves its bytes the same
// way, so bytes / (CTAs x this rate) is the floor such a kernel is judged against (docs/design.md#targets).
//
// WHAT IT COMPUTES. dst[i] = src[i] for i in [0, n), src and dst each n 16-byte vectors (uint4) in this
// GPU's memory. Bytes moved = 2 * 16 * n (read + written). Nothing else: no arithmetic, no peers.
//
// LAUNCH SHAPE. grid = k CTAs (the CTA count under test), block = kThreads (512). Grid-stride: one
// sweep covers gridDim.x * 512 * kUnroll vectors; in it, thread t of CTA b loads kUnroll vectors
// (b * 512 * kUnroll + u * 512 + t, u = 0..kUnroll-1: each u is one coalesced 8 KiB access per CTA)
// into registers before storing any of them, so every thread keeps kUnroll independent 16-byte loads
// in flight (64 KiB per CTA) instead of one. A plain grid-stride loop copies the tail (< one sweep).
// The host may add dynamic shared memory (unused here) so that no two CTAs fit on one SM: then k CTAs
// <= SM count means k distinct SMs.
#include "common.cuh"

namespace {
constexpr int kThreads = 512;  // must match THREADS in experiments/sm_rate.py
constexpr int kUnroll = 8;     // independent 16-byte loads in flight per thread
}  // namespace

extern "C" __global__ void __launch_bounds__(kThreads)
    copy16(const uint4* __restrict__ src, uint4* __restrict__ dst, unsigned long long n) {
  const unsigned long long sweep = (unsigned long long)gridDim.x * kThreads * kUnroll;
  const unsigned long long full = n - n % sweep;  // vectors covered by whole sweeps
  unsigned long long i = (unsigned long long)blockIdx.x * kThreads * kUnroll + threadIdx.x;
  for (; i < full; i += sweep) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = src[i + u * kThreads];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) dst[i + u * kThreads] = v[u];
  }
  for (unsigned long long j = full + (unsigned long long)blockIdx.x * kThreads + threadIdx.x; j < n;
       j += (unsigned long long)gridDim.x * kThreads)
    dst[j] = src[j];
}
