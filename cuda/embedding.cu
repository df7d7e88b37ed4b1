// Embedding gather: out[t] = table[ids[t]], bf16 rows moved as 16-byte vectors.
//
//   ids: [rows] int32, each in [0, vocab) (checked on the host where the ids are built)
//   table: [vocab, hidden]; out: [rows, hidden]; hidden % 8 == 0.
// Launch: one CTA per row, threads stride over the row's hidden / 8 vectors.
#include "common.cuh"

extern "C" __global__ void embedding_bf16(const int* __restrict__ ids, const __nv_bfloat16* __restrict__ table,
                                          __nv_bfloat16* __restrict__ out, int hidden) {
  const uint4* src = reinterpret_cast<const uint4*>(table + (size_t)ids[blockIdx.x] * hidden);
  uint4* dst = reinterpret_cast<uint4*>(out + (size_t)blockIdx.x * hidden);
  for (int v = threadIdx.x; v < hidden / 8; v += blockDim.x) dst[v] = src[v];
}
