// The routing kernels of the MoE block (tw/model/moe.py): top-k + softmax of the router logits, the stable
// permutation of (token, slot) pairs by expert, the gather of token rows into expert order, and the
// weighted un-permute into the communication buffer. The expert GEMMs between them are cuBLAS's.
//
//   logits   float32 [n, E]        the router GEMM's output (float32: see tw/model/moe.py)
//   experts  int32   [n, k]        chosen experts, highest logit first (the lower index on ties)
//   weights  float32 [n, k]        softmax over the k chosen logits
//   offsets  int32   [E + 1]       expert e's permuted rows are [offsets[e], offsets[e + 1])
//   inverse  int32   [n k]         inverse[t k + j] = the permuted row of (token t, slot j)
//   source   int32   [n k]         source[r] = the token whose row permuted row r holds
// E <= TW_MOE_MAX_EXPERTS and k <= TW_MOE_MAX_K (checked in Python).
#include <math.h>

#include "common.cuh"

#define TW_MOE_MAX_EXPERTS 64
#define TW_MOE_MAX_K 8

// One thread per token (E is small: the loop over experts is k E compares).
extern "C" __global__ void moe_topk_softmax(const float* __restrict__ logits, int n, int num_experts, int top_k,
                                            int* __restrict__ experts, float* __restrict__ weights) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= n) return;
  const float* row = logits + (size_t)t * num_experts;
  unsigned long long taken = 0;
  float chosen[TW_MOE_MAX_K];
  int index[TW_MOE_MAX_K];
  for (int j = 0; j < top_k; ++j) {
    int best = -1;
    float v_best = 0.f;
    for (int e = 0; e < num_experts; ++e) {
      if ((taken >> e) & 1ull) continue;
      const float v = row[e];
      if (best < 0 || v > v_best) { best = e; v_best = v; }   // strict: the lower index wins a tie
    }
    taken |= 1ull << best;
    chosen[j] = v_best;
    index[j] = best;
  }
  float p[TW_MOE_MAX_K], sum = 0.f;
  for (int j = 0; j < top_k; ++j) { p[j] = expf(chosen[j] - chosen[0]); sum += p[j]; }   // chosen[0]: the max
  for (int j = 0; j < top_k; ++j) {
    experts[(size_t)t * top_k + j] = index[j];
    weights[(size_t)t * top_k + j] = p[j] / sum;
  }
}

// One CTA (blockDim a multiple of 32, <= 1024). Pass 1 counts the pairs of each expert (warp-aggregated:
// with E = 8 experts, one atomic per pair serialized 32K atomics on 8 shared words); pass 2 walks
// the pairs in flat order, one blockDim-sized chunk at a time, and gives each pair the next row of its
// expert: its rank among the same expert's pairs in its warp (__match_any_sync), plus the earlier
// warps' counts of that expert in this chunk, plus the rows taken by earlier chunks. Token order is
// kept within an expert (stable), as tw/moe.permute does on the CPU.
extern "C" __global__ void moe_permute(const int* __restrict__ experts, int pairs, int num_experts, int top_k,
                                       int* __restrict__ offsets, int* __restrict__ inverse,
                                       int* __restrict__ source) {
  __shared__ int count[TW_MOE_MAX_EXPERTS];
  __shared__ int base[TW_MOE_MAX_EXPERTS];
  __shared__ int warp_count[32][TW_MOE_MAX_EXPERTS];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
  for (int e = tid; e < num_experts; e += blockDim.x) count[e] = 0;
  __syncthreads();
  for (int chunk = 0; chunk < pairs; chunk += blockDim.x) {   // one shared atomic per expert and warp
    const int i = chunk + tid;
    const int e = i < pairs ? experts[i] : -1;
    const unsigned same = __match_any_sync(0xffffffffu, e);
    if (e >= 0 && (same & ((1u << lane) - 1u)) == 0) atomicAdd(&count[e], __popc(same));
  }
  __syncthreads();
  if (tid == 0) {
    int running = 0;
    for (int e = 0; e < num_experts; ++e) { offsets[e] = base[e] = running; running += count[e]; }
    offsets[num_experts] = running;
  }
  for (int chunk = 0; chunk < pairs; chunk += blockDim.x) {
    for (int c = tid; c < warps * num_experts; c += blockDim.x) warp_count[c / num_experts][c % num_experts] = 0;
    __syncthreads();
    const int i = chunk + tid;
    const int e = i < pairs ? experts[i] : -1;
    const unsigned same = __match_any_sync(0xffffffffu, e);
    const int rank = __popc(same & ((1u << lane) - 1u));
    if (e >= 0 && rank == 0) warp_count[warp][e] = __popc(same);
    __syncthreads();
    if (e >= 0) {
      int row = base[e] + rank;
      for (int w = 0; w < warp; ++w) row += warp_count[w][e];
      inverse[i] = row;
      source[row] = i / top_k;
    }
    __syncthreads();
    for (int x = tid; x < num_experts; x += blockDim.x) {
      int s = 0;
      for (int w = 0; w < warps; ++w) s += warp_count[w][x];
      base[x] += s;
    }
    __syncthreads();
  }
}

// The two row copies below are memory-bound: ONE WARP PER ROW (grid-stride over rows, 8 warps per CTA),
// the row's index (and weights) read once, each lane moving the 16-byte vectors lane, lane + 32, ...
// with kUnroll of them loaded before any is stored, so every lane keeps kUnroll (gather) or k x 2
// (un-permute) independent loads in flight, as cuda/copy_rate.cu does. hidden % 8 == 0 (checked in Python).
constexpr int kUnroll = 4;

// xs[r, :] = x[source[r], :], rows of `hidden` bf16.
extern "C" __global__ void moe_gather_rows_bf16(const __nv_bfloat16* __restrict__ x, const int* __restrict__ source,
                                                __nv_bfloat16* __restrict__ xs, int rows, int hidden) {
  const int vec = hidden / 8, lane = threadIdx.x & 31, per_cta = blockDim.x >> 5;
  for (int r = blockIdx.x * per_cta + (threadIdx.x >> 5); r < rows; r += gridDim.x * per_cta) {
    const uint4* src = reinterpret_cast<const uint4*>(x + (size_t)source[r] * hidden);
    uint4* dst = reinterpret_cast<uint4*>(xs + (size_t)r * hidden);
    int c = lane;
    for (; c + 32 * (kUnroll - 1) < vec; c += 32 * kUnroll) {
      uint4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = src[c + 32 * u];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) dst[c + 32 * u] = v[u];
    }
    for (; c < vec; c += 32) dst[c] = src[c];
  }
}

// y[t, :] = sum_j weights[t, j] * out[inverse[t k + j], :], float32 sums in slot order, rounded to bf16 once.
extern "C" __global__ void moe_unpermute_bf16(const __nv_bfloat16* __restrict__ out, const int* __restrict__ inverse,
                                              const float* __restrict__ weights, __nv_bfloat16* __restrict__ y,
                                              int n, int top_k, int hidden) {
  const int vec = hidden / 8, lane = threadIdx.x & 31, per_cta = blockDim.x >> 5;
  for (int t = blockIdx.x * per_cta + (threadIdx.x >> 5); t < n; t += gridDim.x * per_cta) {
    const uint4* src[TW_MOE_MAX_K];
    float w[TW_MOE_MAX_K];
#pragma unroll
    for (int j = 0; j < TW_MOE_MAX_K; ++j) {
      if (j < top_k) {
        src[j] = reinterpret_cast<const uint4*>(out + (size_t)inverse[(size_t)t * top_k + j] * hidden);
        w[j] = weights[(size_t)t * top_k + j];
      }
    }
    uint4* dst = reinterpret_cast<uint4*>(y + (size_t)t * hidden);
    for (int c = lane; c < vec; c += 64) {   // two columns per lane per step: 2 k loads in flight
      const bool two = c + 32 < vec;
      uint4 raw[2][TW_MOE_MAX_K];
#pragma unroll
      for (int j = 0; j < TW_MOE_MAX_K; ++j) {
        if (j < top_k) {
          raw[0][j] = src[j][c];
          if (two) raw[1][j] = src[j][c + 32];
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (h == 1 && !two) break;
        float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}, v[8];
#pragma unroll
        for (int j = 0; j < TW_MOE_MAX_K; ++j) {
          if (j >= top_k) break;
          tw::unpack8(raw[h][j], v);
#pragma unroll
          for (int q = 0; q < 8; ++q) acc[q] += w[j] * v[q];
        }
        dst[c + 32 * h] = tw::pack8(acc);
      }
    }
  }
}
