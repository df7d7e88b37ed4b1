// SiLU-and-mul of the fused gate_up projection: out = silu(gate) * up, bf16 in/out, fp32 math.
//
//   gate_up: [rows, 2 * ffn] (gate = columns [0, ffn), up = columns [ffn, 2 ffn))
//   out:     [rows, ffn]
// Launch: grid-stride over rows * ffn / 8 16-byte vectors (ffn % 8 == 0, checked in Python).
#include "common.cuh"

extern "C" __global__ void silu_mul_bf16(const __nv_bfloat16* __restrict__ gate_up,
                                         __nv_bfloat16* __restrict__ out, int rows, int ffn) {
  const int vec_per_row = ffn / 8;
  const size_t total = (size_t)rows * vec_per_row;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
    const size_t r = i / vec_per_row, c = (i % vec_per_row) * 8;
    float g[8], u[8];
    tw::load8(gate_up + r * 2 * ffn + c, g);
    tw::load8(gate_up + r * 2 * ffn + ffn + c, u);
#pragma unroll
    for (int j = 0; j < 8; ++j) g[j] = g[j] / (1.f + __expf(-g[j])) * u[j];
    tw::store8(out + r * ffn + c, g);
  }
}
