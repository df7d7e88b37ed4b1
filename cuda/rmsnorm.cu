// Fused residual add + RMSNorm, bf16 in/out, fp32 math.
//
//   h = x + residual           (x may be null: h = residual)
//   residual <- r = bf16(h)    (only when x is given)
//   out = bf16( r * rsqrt(mean(r^2) + eps) * weight )
//
// The norm is taken of the residual as stored (bf16), as Hugging Face's bf16 models do (the residual
// add happens in bf16, the norm upcasts it) and as the P2P fused kernel does (cuda/ar_norm_p2p.cu):
// every strategy then normalizes exactly the same values. Launch: one CTA per row, blockDim.x = 32..1024 threads, each thread
// keeps up to MAX_VEC 16-byte vectors of its row in registers (so the row is read once):
// hidden / 8 <= blockDim.x * MAX_VEC. Rows are 16-byte aligned (hidden % 8 == 0, checked in Python).
#include "common.cuh"

constexpr int MAX_VEC = 8;

extern "C" __global__ void add_rmsnorm_bf16(const __nv_bfloat16* __restrict__ x,  // [rows, hidden] or null
                                            __nv_bfloat16* __restrict__ residual,  // [rows, hidden]
                                            const __nv_bfloat16* __restrict__ weight,  // [hidden]
                                            __nv_bfloat16* __restrict__ out,  // [rows, hidden]
                                            int hidden, float eps) {
  __shared__ float scratch[32];
  const int num_vec = hidden / 8;
  const size_t row = (size_t)blockIdx.x * hidden;
  float h[MAX_VEC][8];
  float sumsq = 0.f;
#pragma unroll
  for (int i = 0; i < MAX_VEC; ++i) {
    const int v = threadIdx.x + i * blockDim.x;
    if (v < num_vec) {
      tw::load8(residual + row + 8 * v, h[i]);
      if (x != nullptr) {
        float a[8];
        tw::load8(x + row + 8 * v, a);
#pragma unroll
        for (int j = 0; j < 8; ++j) h[i][j] += a[j];
        const uint4 r = tw::pack8(h[i]);
        *reinterpret_cast<uint4*>(residual + row + 8 * v) = r;
        tw::unpack8(r, h[i]);
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) sumsq += h[i][j] * h[i][j];
    }
  }
  const float rstd = rsqrtf(tw::block_sum(sumsq, scratch) / hidden + eps);
#pragma unroll
  for (int i = 0; i < MAX_VEC; ++i) {
    const int v = threadIdx.x + i * blockDim.x;
    if (v < num_vec) {
      float w[8];
      tw::load8(weight + 8 * v, w);
#pragma unroll
      for (int j = 0; j < 8; ++j) h[i][j] = h[i][j] * rstd * w[j];
      tw::store8(out + row + 8 * v, h[i]);
    }
  }
}
