// Shared device helpers for tw's kernels.
//
// Vectors: a `uint4` holds 8 bf16 values (16 bytes), the unit of every global-memory access in the
// memory-bound kernels. `load8`/`store8` convert between that and 8 fp32 values in registers.
// Every kernel that uses them requires 16-byte aligned rows, i.e. hidden % 8 == 0 and 16-byte aligned
// base pointers; the Python wrappers check both before launching.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

#define TW_DEVICE __device__ __forceinline__

namespace tw {

// bf16 -> fp32 is exact: the bf16 bits are the fp32's top 16 bits. One shift or mask per value (the
// library's __bfloat1622float2 compiles to a PRMT + shift for the high half).
TW_DEVICE void unpack8(const uint4& v, float (&f)[8]) {
  const unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

TW_DEVICE uint4 pack8(const float (&f)[8]) {
  uint4 v;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  return v;
}

TW_DEVICE void load8(const __nv_bfloat16* p, float (&f)[8]) {
  unpack8(*reinterpret_cast<const uint4*>(p), f);
}

TW_DEVICE void store8(__nv_bfloat16* p, const float (&f)[8]) {
  *reinterpret_cast<uint4*>(p) = pack8(f);
}

// Sum over a warp, result in every lane.
TW_DEVICE float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024), result in every thread.
// `scratch` needs 32 floats of shared memory; the call contains __syncthreads().
TW_DEVICE float block_sum(float x, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  x = warp_sum(x);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  const int num_warps = blockDim.x >> 5;
  x = lane < num_warps ? scratch[lane] : 0.f;
  return warp_sum(x);
}

}  // namespace tw
