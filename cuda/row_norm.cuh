// The arithmetic of the fused reduce + residual-add + RMSNorm, one copy for both transports that do it:
// the P2P kernels (cuda/ar_norm_p2p.cu, warp_rows) and the copy-engine transport's local kernel
// (cuda/ce_norm.cu). They move their rows differently (pushes over peer pointers vs. rows a copy engine
// delivered) but compute every value with these functions, in the same order, with the same rounding
// points, so for one TW_TP their results are bit-identical (tests/mpi_ce.py compares them bit for bit):
//   h   = S_0 + S_1 + ... + S_{tp-1} + residual     fp32, sources in rank order, then the residual
//   r   = bf16(h)                                    what the residual stream holds
//   ss += r^2 over the row, vector by vector         the norm is taken of r, as stored
//   y   = bf16(r * rsqrt(ss / H + eps) * w)
// A lane handles kStep vectors (of 8 values) per step; the sum of squares is grouped by that, so the
// step count is part of the arithmetic: step_for_tp gives it from the compile-time TP (0: run-time TP).
#pragma once
#include "common.cuh"

namespace tw {
namespace rownorm {

constexpr int step_for_tp(int tp) { return tp == 0 ? 2 : (tp <= 2 ? 4 : (tp <= 4 ? 2 : 1)); }

// acc = raw[0][s] + raw[1][s] + ... + raw[num_src - 1][s] (fp32, in rank order).
template <int kSources, int N>
TW_DEVICE void sum_sources(const uint4 (&raw)[kSources][N], int s, int num_src, float (&acc)[8]) {
  float f[8];
  unpack8(raw[0][s], acc);
#pragma unroll
  for (int k = 1; k < kSources; ++k) {
    if (k >= num_src) break;
    unpack8(raw[k][s], f);
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] += f[e];
  }
}

// r = bf16(acc + residual), returned; ss += the squares of r's 8 values, in order.
TW_DEVICE uint4 add_residual(float (&acc)[8], const uint4& residual, float& ss) {
  float f[8];
  unpack8(residual, f);
#pragma unroll
  for (int e = 0; e < 8; ++e) acc[e] += f[e];
  const uint4 r = pack8(acc);
  unpack8(r, f);
#pragma unroll
  for (int e = 0; e < 8; ++e) ss += f[e] * f[e];
  return r;
}

// y = bf16(r * rinv * w) for the 8 values of one vector.
TW_DEVICE uint4 scale(const uint4& r, const uint4& w, float rinv) {
  float h[8], g[8];
  unpack8(r, h);
  unpack8(w, g);
#pragma unroll
  for (int e = 0; e < 8; ++e) h[e] = h[e] * rinv * g[e];
  return pack8(h);
}

}  // namespace rownorm
}  // namespace tw
