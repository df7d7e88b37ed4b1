// Causal attention over a KV cache (one contiguous slot range per sequence): varlen batches,
// prefixes already in the cache, GQA, decode tokens (query length 1) in the same batch.
// bf16 in and out, fp32 accumulation and softmax.
//
// What it computes. Sequence s owns cache slots [kv_start[s], kv_start[s] + prefix_len[s] + n_s);
// its n_s new tokens are rows cu_seqlens_q[s] .. cu_seqlens_q[s+1]-1 of q. New token j has position
// p = prefix_len[s] + j (its own K/V are already in the cache at slot kv_start[s] + p) and
//   out[t, h] = softmax_k(scale * q[t, h] . K[kv_start + k, h / group]) @ V[...],  k = 0 .. p,
// with group = num_heads / num_kv_heads (GQA).
//
// Launch shape. grid = (num_heads, num_work_items), block = 32 * NUM_WARPS threads, dynamic shared
// memory (BLOCK_M * D + 4 * BLOCK_N * D) * 2 bytes. A work item (int2) = (sequence, first query row
// q0 within the sequence's new tokens) and covers BLOCK_M = 16 * NUM_WARPS query rows. The host builds
// the item list heaviest first (most KV tiles), so the longest blocks start in the first wave.
// blockIdx.x is the head, so the q heads that share a kv head run side by side and share L2.
//
// Algorithm (FlashAttention-2 forward). Each warp owns 16 query rows; its Q tile lives in registers as
// mma A fragments for the whole kernel. K/V tiles of BLOCK_N = 64 keys are double-buffered in shared
// memory with cp.async (the load of tile t+1 overlaps the math of tile t; one __syncthreads per
// tile). S = Q K^T with mma.sync m16n8k16 bf16 -> fp32 (K read by ldmatrix), online softmax in fp32
// in the log2 domain (exp2 of scale*log2(e)-prescaled scores, running max m and sum l per row), P
// rounded to bf16 and fed straight from the S accumulators as the A operand of O += P V (V read by
// ldmatrix.trans). KV tiles are visited from 0 upward, so every row sees key 0 (always visible) in its
// first tile and its running max is finite from then on; tiles wholly above a warp's diagonal are
// skipped by that warp, the causal mask is applied only on tiles that cross it. At the end O / l is
// staged through shared memory and written with 16-byte stores.
//
// Shared memory layout: rows of D bf16 = D/8 chunks of 16 bytes; chunk c of row r is stored at chunk
// c ^ (r & 7) (XOR swizzle), so the 8 row addresses of every ldmatrix phase and every cp.async hit 8
// different 16-byte bank groups (no bank conflicts, no padding).
//
// Out-of-range handling: query rows past the sequence's end are zero-filled on load and never stored;
// keys past the last needed position are zero-filled (cp.async src-size 0: no global read) and masked,
// so no slot outside [kv_start, kv_start + prefix + n) is ever read.
//
// Two implementations share this contract: the mma.sync kernels described here (any sm_80+ GPU,
// head_dim 64 or 128, 64 or 128 query rows per CTA), and at the end of the file a Hopper-only
// wgmma kernel (sm_90a, head_dim 128, 128 query rows, 128-key tiles) that tw/ops/attention.py picks by
// default where it applies; on the lab's H200 it runs ~1.3-1.5x faster than the mma.sync kernels.
//
// Limits: head_dim D in {64, 128} (compiled instances below); q row stride a multiple of 8 elements
// and all base pointers 16-byte aligned; num_heads % num_kv_heads == 0; gridDim.y <= 65535 work items.
// The Python wrapper (tw/ops/attention.py) checks all of these before launching.
#include "common.cuh"

namespace {

using bf16 = __nv_bfloat16;
constexpr int BLOCK_N = 64;  // keys per KV tile

TW_DEVICE uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// 16-byte global -> shared copy; with pred false nothing is read and the 16 bytes are zero-filled.
TW_DEVICE void cp_async16(uint32_t dst, const void* src, bool pred) {
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
TW_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
TW_DEVICE void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

TW_DEVICE void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
TW_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// c[16x8] += a[16x16] * b[16x8]; bf16 operands, fp32 accumulators.
TW_DEVICE void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

TW_DEVICE float fast_exp2(float x) {  // ex2.approx(-inf) = +0, which masked scores rely on
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// One key tile of the online softmax, shared by the mma.sync and wgmma kernels (same fragment layout:
// s[j][c] is key 8j + 2 tq + (c & 1) of row g (c < 2) or row g + 8 (c >= 2); a row is spread over the
// 4 lanes of a quad, hence the two xor-shuffles). Masks keys past each row's position when the tile
// crosses the diagonal, turns s into P = exp2(S * scale_log2 - m), and rescales l and o.
template <int NJ, int ND>
TW_DEVICE void softmax_tile(float (&s)[NJ][4], float (&o)[ND][4], float (&m)[2], float (&l)[2], int key0,
                            bool on_diagonal, int tq, const int (&pos)[2], float scale_log2) {
  if (on_diagonal) {
#pragma unroll
    for (int j = 0; j < NJ; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c)
        if (key0 + 8 * j + 2 * tq + (c & 1) > pos[c >> 1]) s[j][c] = -INFINITY;
  }
  float mx[2] = {m[0], m[1]};
#pragma unroll
  for (int j = 0; j < NJ; ++j) {
    mx[0] = fmaxf(mx[0], fmaxf(s[j][0], s[j][1]));
    mx[1] = fmaxf(mx[1], fmaxf(s[j][2], s[j][3]));
  }
  float m_scaled[2], alpha[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
    // A row with nothing visible yet keeps max -inf; subtracting 0 instead avoids inf - inf = NaN.
    m_scaled[i] = mx[i] == -INFINITY ? 0.f : mx[i] * scale_log2;
    alpha[i] = fast_exp2(m[i] * scale_log2 - m_scaled[i]);  // 0 while m was -inf
    m[i] = mx[i];
    l[i] *= alpha[i];
  }
#pragma unroll
  for (int j = 0; j < NJ; ++j) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      s[j][c] = fast_exp2(fmaf(s[j][c], scale_log2, -m_scaled[c >> 1]));
      l[c >> 1] += s[j][c];
    }
  }
#pragma unroll
  for (int d = 0; d < ND; ++d) {
    o[d][0] *= alpha[0];
    o[d][1] *= alpha[0];
    o[d][2] *= alpha[1];
    o[d][3] *= alpha[1];
  }
}

TW_DEVICE uint32_t pack_bf16x2(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // lo -> low half = lower column index
  return *reinterpret_cast<uint32_t*>(&v);
}

// Element offset of 16-byte chunk `chunk` of row `row` in a swizzled [rows][D] tile.
template <int D>
TW_DEVICE int swz(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

template <int D, int NUM_WARPS>
__device__ __forceinline__ void attention_fwd(const bf16* __restrict__ q, long long q_row_stride,
                                              const bf16* __restrict__ k_cache,
                                              const bf16* __restrict__ v_cache, bf16* __restrict__ out,
                                              const int* __restrict__ cu_seqlens_q,
                                              const int* __restrict__ kv_start,
                                              const int* __restrict__ prefix_len,
                                              const int2* __restrict__ work, int num_heads,
                                              int num_kv_heads, float scale_log2) {
  constexpr int BLOCK_M = 16 * NUM_WARPS;
  constexpr int NUM_THREADS = 32 * NUM_WARPS;
  constexpr int CHUNKS = D / 8;  // 16-byte chunks per row
  static_assert(D == 64 || D == 128, "head_dim must be 64 or 128");

  extern __shared__ __align__(128) uint8_t smem[];
  bf16* s_q = reinterpret_cast<bf16*>(smem);  // [BLOCK_M][D]; reused for the output tile
  const uint32_t s_q_u32 = smem_u32(s_q);
  const uint32_t s_k_u32 = s_q_u32 + BLOCK_M * D * 2;        // [2][BLOCK_N][D]
  const uint32_t s_v_u32 = s_k_u32 + 2 * BLOCK_N * D * 2;    // [2][BLOCK_N][D]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int head = blockIdx.x;
  const int2 item = work[blockIdx.y];
  const int seq = item.x, q0 = item.y;
  const int tok0 = cu_seqlens_q[seq];
  const int n = cu_seqlens_q[seq + 1] - tok0;
  const int prefix = prefix_len[seq];
  const int rows = min(BLOCK_M, n - q0);           // valid query rows in this block (>= 1)
  const int kv_end = prefix + q0 + rows;           // keys [0, kv_end) are visible to some row
  const int num_tiles = (kv_end + BLOCK_N - 1) / BLOCK_N;
  const int kv_head = head / (num_heads / num_kv_heads);
  const long long kv_row_stride = static_cast<long long>(num_kv_heads) * D;
  const long long kv_offset = static_cast<long long>(kv_start[seq]) * kv_row_stride + kv_head * D;
  const bf16* k_base = k_cache + kv_offset;
  const bf16* v_base = v_cache + kv_offset;

  // ---- prologue: Q tile and KV tile 0 in one cp.async group
#pragma unroll
  for (int it = 0; it < BLOCK_M * CHUNKS / NUM_THREADS; ++it) {
    const int i = tid + it * NUM_THREADS;
    const int r = i / CHUNKS, c = i % CHUNKS;
    const bool ok = r < rows;
    const bf16* src = q + static_cast<long long>(tok0 + q0 + (ok ? r : 0)) * q_row_stride + head * D + c * 8;
    cp_async16(s_q_u32 + swz<D>(r, c) * 2, src, ok);
  }
  auto load_kv = [&](int tile, int buf) {
#pragma unroll
    for (int it = 0; it < BLOCK_N * CHUNKS / NUM_THREADS; ++it) {
      const int i = tid + it * NUM_THREADS;
      const int r = i / CHUNKS, c = i % CHUNKS;
      const int key = tile * BLOCK_N + r;
      const bool ok = key < kv_end;
      const long long off = static_cast<long long>(ok ? key : 0) * kv_row_stride + c * 8;
      const uint32_t dst = (buf * BLOCK_N * D + swz<D>(r, c)) * 2;
      cp_async16(s_k_u32 + dst, k_base + off, ok);
      cp_async16(s_v_u32 + dst, v_base + off, ok);
    }
  };
  load_kv(0, 0);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();

  // Q fragments (A operand, 16 rows x D): x4 = rows 0-7 / 8-15 of chunk 2kk, then of chunk 2kk+1.
  uint32_t qf[D / 16][4];
  {
    const int r = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(qf[kk], s_q_u32 + swz<D>(r, 2 * kk + (lane >> 4)) * 2);
  }

  float o[D / 8][4];
#pragma unroll
  for (int d = 0; d < D / 8; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY};  // running max (raw score units) of rows g and g+8
  float l[2] = {0.f, 0.f};              // running sum of exp, partial over this thread's columns

  const int g = lane >> 2, tq = lane & 3;
  const int warp_pos0 = prefix + q0 + warp * 16;  // position of this warp's first query row
  const int pos[2] = {warp_pos0 + g, warp_pos0 + g + 8};
  // Per-lane ldmatrix coordinates: K (non-trans): key row, chunk parity; V (trans): key row, chunk offset.
  const int k_row = (lane & 7) + (lane >> 4) * 8, k_chunk = (lane >> 3) & 1;
  const int v_row = (lane & 7) + ((lane >> 3) & 1) * 8, v_chunk = lane >> 4;

  for (int t = 0; t < num_tiles; ++t) {
    // After this barrier: tile t is in shared memory for everyone, and every warp has finished tile
    // t-1, so buffer (t+1)&1 may be overwritten by the prefetch of tile t+1.
    cp_async_wait_all();
    __syncthreads();
    if (t + 1 < num_tiles) {
      load_kv(t + 1, (t + 1) & 1);
      cp_async_commit();
    }
    const int key0 = t * BLOCK_N;
    // Warp-uniform skips: the whole tile is above this warp's diagonal, or the warp has no valid row.
    if (key0 > warp_pos0 + 15 || warp * 16 >= rows) continue;

    const uint32_t k_tile = s_k_u32 + (t & 1) * BLOCK_N * D * 2;
    const uint32_t v_tile = s_v_u32 + (t & 1) * BLOCK_N * D * 2;

    // S[16 x 64] = Q K^T: x4 = (keys 0-7, chunk 2kk), (keys 0-7, 2kk+1), (keys 8-15, 2kk), (8-15, 2kk+1).
    float s[BLOCK_N / 8][4];
#pragma unroll
    for (int j = 0; j < BLOCK_N / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int jp = 0; jp < BLOCK_N / 16; ++jp) {
        uint32_t b[4];
        ldmatrix_x4(b, k_tile + swz<D>(jp * 16 + k_row, 2 * kk + k_chunk) * 2);
        mma_bf16(s[2 * jp], qf[kk], b[0], b[1]);
        mma_bf16(s[2 * jp + 1], qf[kk], b[2], b[3]);
      }
    }

    softmax_tile(s, o, m, l, key0, key0 + BLOCK_N - 1 > warp_pos0, tq, pos, scale_log2);

    // O[16 x D] += P V. The S accumulators of n-tiles 2ks, 2ks+1 are exactly the A fragment of the
    // k-step ks (keys 16ks .. 16ks+15). V x4.trans = (keys 0-7, chunk 2dp), (keys 8-15, 2dp),
    // (keys 0-7, 2dp+1), (keys 8-15, 2dp+1).
#pragma unroll
    for (int ks = 0; ks < BLOCK_N / 16; ++ks) {
      const uint32_t a[4] = {pack_bf16x2(s[2 * ks][0], s[2 * ks][1]), pack_bf16x2(s[2 * ks][2], s[2 * ks][3]),
                             pack_bf16x2(s[2 * ks + 1][0], s[2 * ks + 1][1]),
                             pack_bf16x2(s[2 * ks + 1][2], s[2 * ks + 1][3])};
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, v_tile + swz<D>(ks * 16 + v_row, 2 * dp + v_chunk) * 2);
        mma_bf16(o[2 * dp], a, b[0], b[1]);
        mma_bf16(o[2 * dp + 1], a, b[2], b[3]);
      }
    }
  }

  // ---- epilogue: O / l -> bf16 -> this warp's rows of the Q tile (only this warp ever read them)
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    l[i] = l[i] > 0.f ? 1.f / l[i] : 0.f;  // 0 only on rows past the sequence end (never stored)
  }
  const int r0 = warp * 16 + g;
#pragma unroll
  for (int d = 0; d < D / 8; ++d) {
    *reinterpret_cast<uint32_t*>(s_q + swz<D>(r0, d) + 2 * tq) = pack_bf16x2(o[d][0] * l[0], o[d][1] * l[0]);
    *reinterpret_cast<uint32_t*>(s_q + swz<D>(r0 + 8, d) + 2 * tq) = pack_bf16x2(o[d][2] * l[1], o[d][3] * l[1]);
  }
  __syncwarp();
  const long long out_row_stride = static_cast<long long>(num_heads) * D;
#pragma unroll
  for (int i = lane; i < 16 * CHUNKS; i += 32) {
    const int r = warp * 16 + i / CHUNKS, c = i % CHUNKS;
    if (r < rows) {
      const uint4 v = *reinterpret_cast<const uint4*>(s_q + swz<D>(r, c));
      *reinterpret_cast<uint4*>(out + (tok0 + q0 + r) * out_row_stride + head * D + c * 8) = v;
    }
  }
}

}  // namespace

#define TW_ATTENTION_KERNEL(D, NUM_WARPS, MIN_BLOCKS)                                                   \
  extern "C" __global__ void __launch_bounds__(32 * NUM_WARPS, MIN_BLOCKS)                             \
      attention_fwd_bf16_d##D##_w##NUM_WARPS(                                                          \
          const bf16* q, long long q_row_stride, const bf16* k_cache, const bf16* v_cache, bf16* out,   \
          const int* cu_seqlens_q, const int* kv_start, const int* prefix_len, const int2* work,        \
          int num_heads, int num_kv_heads, float scale_log2) {                                          \
    attention_fwd<D, NUM_WARPS>(q, q_row_stride, k_cache, v_cache, out, cu_seqlens_q, kv_start,        \
                                prefix_len, work, num_heads, num_kv_heads, scale_log2);                 \
  }

// 8 warps = 128 query rows per CTA, one CTA per SM (up to 255 registers per thread);
// 4 warps = 64 query rows per CTA, two CTAs per SM. Same per-warp work, different sharing of K/V tiles.
TW_ATTENTION_KERNEL(128, 8, 1)
TW_ATTENTION_KERNEL(128, 4, 2)
TW_ATTENTION_KERNEL(64, 8, 1)
TW_ATTENTION_KERNEL(64, 4, 2)

// ================================================================ Hopper (sm_90a) variant: wgmma
//
// Same contract, work items and masking as above, with BLOCK_M = 128 query rows = 2 warpgroups of 64
// rows, BLOCK_N = 128 keys, head_dim 128 only. S = Q K^T is one wgmma.m64n128k16 per 16 dims with Q and
// K both read from shared memory through descriptors; O += P V takes P straight from the S registers
// (the wgmma A-register layout of a warp is the mma.sync m16n8k16 one) and V through a transposed
// descriptor, as two wgmma.m64n64k16 (one per 64-dim half, so every B operand lies inside one
// 64-element swizzle row and the descriptor's leading-byte offset is never used).
//
// Shared tiles use the canonical 128-byte swizzle: a [R][128] bf16 tile is two halves of 64 columns,
// half h at byte h * R * 128; row r of a half is 128 bytes at r * 128 and its 16-byte chunk c sits at
// chunk c ^ (r & 7). Every 8-row group is one 1024-byte swizzle atom (stride-byte offset 1024), and the
// tile bases are 1024-byte aligned so the descriptor's base offset is 0. The same layout serves as
// K-major (Q, K: rows = M or N, columns = the contracted head dim) and MN-major (V: rows = the
// contracted keys, columns = N).
//
// cp.async writes through the generic proxy and wgmma reads through the async proxy, hence the
// fence.proxy.async between cp.async.wait and the barrier that publishes a tile.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
namespace {

constexpr int WG_BLOCK_M = 128, WG_BLOCK_N = 128, WG_D = 128;

TW_DEVICE uint32_t sw128(int row, int chunk, int rows) {  // byte offset of 16-byte chunk (0..15)
  return (chunk >> 3) * rows * 128 + row * 128 + (((chunk & 7) ^ (row & 7)) << 4);
}

TW_DEVICE uint64_t smem_desc(uint32_t addr) {  // 128-byte swizzle, LBO = SBO = 1024 bytes
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(1024 >> 4) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

TW_DEVICE void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
TW_DEVICE void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
TW_DEVICE void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
TW_DEVICE void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Pin accumulator registers at a point (the compiler must not move their reads/writes across it).
template <int N>
TW_DEVICE void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// d[64x128] (+)= A[64x16] (smem desc, K-major) * B[16x128] (smem desc, K-major, i.e. stored [N][K]).
TW_DEVICE void wgmma_m64n128k16_ss(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

// d[64x64] += A[64x16] (registers, mma.sync A layout per warp) * B[16x64] (smem desc, MN-major: stored [K][N]).
TW_DEVICE void wgmma_m64n64k16_rs_tb(float* d, const uint32_t (&a)[4], uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}

}  // namespace
#endif

extern "C" __global__ void __launch_bounds__(256, 1)
    attention_fwd_bf16_d128_wgmma(const bf16* q, long long q_row_stride, const bf16* k_cache,
                                  const bf16* v_cache, bf16* out, const int* cu_seqlens_q, const int* kv_start,
                                  const int* prefix_len, const int2* work, int num_heads, int num_kv_heads,
                                  float scale_log2) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int NUM_THREADS = 256, CHUNKS = WG_D / 8;
  extern __shared__ uint8_t smem_dyn[];
  // 1024-byte aligned base (the launch asks for 1024 extra bytes).
  const uint32_t s_q = (smem_u32(smem_dyn) + 1023) & ~1023u;            // [128 rows][128], 32 KB
  uint8_t* s_q_ptr = smem_dyn + (s_q - smem_u32(smem_dyn));
  constexpr uint32_t TILE_BYTES = WG_BLOCK_N * WG_D * 2;                  // 32 KB
  const uint32_t s_k = s_q + WG_BLOCK_M * WG_D * 2;                       // [2][128 keys][128]
  const uint32_t s_v = s_k + 2 * TILE_BYTES;                              // [2][128 keys][128]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2;
  const int head = blockIdx.x;
  const int2 item = work[blockIdx.y];
  const int seq = item.x, q0 = item.y;
  const int tok0 = cu_seqlens_q[seq];
  const int n = cu_seqlens_q[seq + 1] - tok0;
  const int prefix = prefix_len[seq];
  const int rows = min(WG_BLOCK_M, n - q0);
  const int kv_end = prefix + q0 + rows;
  const int num_tiles = (kv_end + WG_BLOCK_N - 1) / WG_BLOCK_N;
  const int kv_head = head / (num_heads / num_kv_heads);
  const long long kv_row_stride = static_cast<long long>(num_kv_heads) * WG_D;
  const long long kv_offset = static_cast<long long>(kv_start[seq]) * kv_row_stride + kv_head * WG_D;
  const bf16* k_base = k_cache + kv_offset;
  const bf16* v_base = v_cache + kv_offset;

#pragma unroll
  for (int it = 0; it < WG_BLOCK_M * CHUNKS / NUM_THREADS; ++it) {
    const int i = tid + it * NUM_THREADS;
    const int r = i / CHUNKS, c = i % CHUNKS;
    const bool ok = r < rows;
    const bf16* src = q + static_cast<long long>(tok0 + q0 + (ok ? r : 0)) * q_row_stride + head * WG_D + c * 8;
    cp_async16(s_q + sw128(r, c, WG_BLOCK_M), src, ok);
  }
  auto load_kv = [&](int tile, int buf) {
#pragma unroll
    for (int it = 0; it < WG_BLOCK_N * CHUNKS / NUM_THREADS; ++it) {
      const int i = tid + it * NUM_THREADS;
      const int r = i / CHUNKS, c = i % CHUNKS;
      const int key = tile * WG_BLOCK_N + r;
      const bool ok = key < kv_end;
      const long long off = static_cast<long long>(ok ? key : 0) * kv_row_stride + c * 8;
      const uint32_t dst = buf * TILE_BYTES + sw128(r, c, WG_BLOCK_N);
      cp_async16(s_k + dst, k_base + off, ok);
      cp_async16(s_v + dst, v_base + off, ok);
    }
  };
  load_kv(0, 0);
  cp_async_commit();

  float o[WG_D / 8][4];
#pragma unroll
  for (int d = 0; d < WG_D / 8; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.f, 0.f};
  const int g = lane >> 2, tq = lane & 3;
  const int wg_pos0 = prefix + q0 + wg * 64;           // position of this warpgroup's first row
  const int pos[2] = {wg_pos0 + (warp & 3) * 16 + g, wg_pos0 + (warp & 3) * 16 + g + 8};
  const uint32_t q_wg = s_q + wg * 64 * 128;           // this warpgroup's 64 rows in each half

  for (int t = 0; t < num_tiles; ++t) {
    cp_async_wait_all();
    fence_proxy_async();
    __syncthreads();  // tile t published; everyone is done with tile t-1 (buffer (t+1)&1 is free)
    if (t + 1 < num_tiles) {
      load_kv(t + 1, (t + 1) & 1);
      cp_async_commit();
    }
    const int key0 = t * WG_BLOCK_N;
    if (key0 > wg_pos0 + 63 || wg * 64 >= rows) continue;  // warpgroup-uniform skip
    const uint32_t k_tile = s_k + (t & 1) * TILE_BYTES, v_tile = s_v + (t & 1) * TILE_BYTES;

    float s[WG_BLOCK_N / 8][4];  // = the m64n128 accumulator, s[j][c] <-> d[4j + c]
    float (&sd)[64] = reinterpret_cast<float (&)[64]>(s);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < WG_D / 16; ++kk) {  // 16 dims per step: half kk/4, byte 32 * (kk%4) in the row
      const uint32_t koff = (kk & 3) * 32;
      wgmma_m64n128k16_ss(sd, smem_desc(q_wg + (kk >> 2) * WG_BLOCK_M * 128 + koff),
                          smem_desc(k_tile + (kk >> 2) * WG_BLOCK_N * 128 + koff), kk > 0);
    }
    wgmma_commit();
    wgmma_wait_all();
    fence_regs(sd);

    softmax_tile(s, o, m, l, key0, key0 + WG_BLOCK_N - 1 > wg_pos0, tq, pos, scale_log2);
    uint32_t p[WG_BLOCK_N / 16][4];  // A fragments of P, one per 16 keys
#pragma unroll
    for (int ks = 0; ks < WG_BLOCK_N / 16; ++ks) {
      p[ks][0] = pack_bf16x2(s[2 * ks][0], s[2 * ks][1]);
      p[ks][1] = pack_bf16x2(s[2 * ks][2], s[2 * ks][3]);
      p[ks][2] = pack_bf16x2(s[2 * ks + 1][0], s[2 * ks + 1][1]);
      p[ks][3] = pack_bf16x2(s[2 * ks + 1][2], s[2 * ks + 1][3]);
    }
    float (&od)[64] = reinterpret_cast<float (&)[64]>(o);
    fence_regs(od);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < WG_BLOCK_N / 16; ++ks) {  // keys 16ks..: 2 swizzle atoms = 2048 bytes per step
#pragma unroll
      for (int h = 0; h < 2; ++h)
        wgmma_m64n64k16_rs_tb(od + 32 * h, p[ks], smem_desc(v_tile + h * WG_BLOCK_N * 128 + ks * 2048));
    }
    wgmma_commit();
    wgmma_wait_all();
    fence_regs(od);
  }

  // Epilogue as in the mma.sync kernel: stage this warp's 16 rows in its own rows of the Q tile (wgmma
  // reads of Q finished with the last wait), then 16-byte stores.
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    l[i] = l[i] > 0.f ? 1.f / l[i] : 0.f;
  }
  const int r0 = warp * 16 + g;
#pragma unroll
  for (int d = 0; d < WG_D / 8; ++d) {
    *reinterpret_cast<uint32_t*>(s_q_ptr + sw128(r0, d, WG_BLOCK_M) + 4 * tq) =
        pack_bf16x2(o[d][0] * l[0], o[d][1] * l[0]);
    *reinterpret_cast<uint32_t*>(s_q_ptr + sw128(r0 + 8, d, WG_BLOCK_M) + 4 * tq) =
        pack_bf16x2(o[d][2] * l[1], o[d][3] * l[1]);
  }
  __syncwarp();
  const long long out_row_stride = static_cast<long long>(num_heads) * WG_D;
#pragma unroll
  for (int i = lane; i < 16 * CHUNKS; i += 32) {
    const int r = warp * 16 + i / CHUNKS, c = i % CHUNKS;
    if (r < rows) {
      const uint4 v = *reinterpret_cast<const uint4*>(s_q_ptr + sw128(r, c, WG_BLOCK_M));
      *reinterpret_cast<uint4*>(out + (tok0 + q0 + r) * out_row_stride + head * WG_D + c * 8) = v;
    }
  }
#endif
}
