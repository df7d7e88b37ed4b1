// RoPE (rotate-half / NeoX layout, as Llama and Qwen) on the fused QKV projection, plus the KV-cache
// store.
//
//   qkv:   [rows, row_stride] with q heads, then k heads, then v heads, each head_dim wide
//   bias:  [num_heads + 2 num_kv_heads, head_dim] or null (Qwen's QKV bias, added before rotation)
//   pos:   [rows] int32 position of each token in its sequence
//   slot:  [rows] int32 KV-cache row of each token
//   inv_freq: [head_dim / 2] fp32
//   q is rotated in place; rotated k and (biased) v go to k_cache / v_cache [slots, num_kv_heads, head_dim].
//
// For pair i < head_dim/2 of a head: angle = pos * inv_freq[i],
//   x'[i] = x[i] cos - x[i + d/2] sin,  x'[i + d/2] = x[i + d/2] cos + x[i] sin.
// The angle is formed in fp32 (as vLLM's cos/sin cache), sincosf is the accurate (not fast-math) one.
// Launch: one CTA per token; threads stride over (head, pair).
#include "common.cuh"

extern "C" __global__ void rope_store_kv_bf16(__nv_bfloat16* __restrict__ qkv, int row_stride,
                                              const __nv_bfloat16* __restrict__ bias,
                                              const int* __restrict__ pos, const int* __restrict__ slot,
                                              const float* __restrict__ inv_freq,
                                              __nv_bfloat16* __restrict__ k_cache,
                                              __nv_bfloat16* __restrict__ v_cache, int num_heads,
                                              int num_kv_heads, int head_dim) {
  const int t = blockIdx.x, half = head_dim / 2;
  __nv_bfloat16* row = qkv + (size_t)t * row_stride;
  const float p = (float)pos[t];
  const size_t cache_row = (size_t)slot[t] * num_kv_heads * head_dim;
  const int rotated_heads = num_heads + num_kv_heads;
  for (int idx = threadIdx.x; idx < rotated_heads * half; idx += blockDim.x) {
    const int head = idx / half, i = idx % half;
    const int c = head * head_dim + i;
    float x1 = __bfloat162float(row[c]), x2 = __bfloat162float(row[c + half]);
    if (bias != nullptr) {
      x1 += __bfloat162float(bias[c]);
      x2 += __bfloat162float(bias[c + half]);
    }
    float s, co;
    sincosf(p * inv_freq[i], &s, &co);
    const __nv_bfloat16 y1 = __float2bfloat16(x1 * co - x2 * s), y2 = __float2bfloat16(x2 * co + x1 * s);
    if (head < num_heads) {
      row[c] = y1;
      row[c + half] = y2;
    } else {
      __nv_bfloat16* k = k_cache + cache_row + (size_t)(head - num_heads) * head_dim;
      k[i] = y1;
      k[i + half] = y2;
    }
  }
  const int v_off = rotated_heads * head_dim;
  for (int c = threadIdx.x; c < num_kv_heads * head_dim; c += blockDim.x) {
    float v = __bfloat162float(row[v_off + c]);
    if (bias != nullptr) v += __bfloat162float(bias[v_off + c]);
    v_cache[cache_row + c] = __float2bfloat16(v);
  }
}
