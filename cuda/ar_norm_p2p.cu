// Fused AllReduce + residual-add + RMSNorm over CUDA-IPC peer pointers (push-based), and the plain
// all-reduce / reduce-scatter / all-gather over the same transport.
//
// WHAT IT COMPUTES (rows [start, end) of the staging buffer S_r of every TP rank r, hidden H, bf16):
//   p2p_ar_norm        two-shot, sharded (TokenWeave's order). Rank r owns rows owned_rows(start,end,r)
//                      (tw/comm/__init__.py; contiguous blocks of ceil(n/tp) rows). For its rows:
//                        h = (S_0 + S_1 + ... + S_{tp-1})[row] + residual[row]   (fp32, fixed rank order)
//                        residual[row] = r = bf16(h);  y = bf16(r * rsqrt(mean(r^2) + eps) * weight)
//                      (the norm is taken of the residual as stored, bf16, as cuda/rmsnorm.cu does)
//                      and y lands in out[row] on EVERY rank. Each row is computed once, by its owner,
//                      so every rank holds bit-identical results.
//   p2p_ar_norm_pull   the same result as p2p_ar_norm, pulled: every rank first signals that its staging
//                      rows are ready (no data moves), then each owner READS its rows' partials from the
//                      peers' staging (over NVLink), adds, norms and pushes the normed rows. About half
//                      the bytes through the rank's own SMs: no partials pushed in phase 1 and no recv
//                      area read back in phase 2 (the peers' memory serves the reads).
//   p2p_norm_only      DECOMPOSITION ONLY (an emulated rank's --emulate-comm norm): the owner's add + norm
//                      of its own rows from its own staging, no peer reads, writes or flags. Its result is
//                      not the all-reduce; it times what the fused kernel costs when moving bytes is free.
//   p2p_ar_norm_replicated  two-shot, baseline order (sharded=False): the owner pushes s = bf16(sum) to
//                      every rank's staging, then every rank does h = s + residual, residual = h,
//                      out = RMSNorm(h)*w on all rows (the residual stream is replicated).
//   p2p_all_reduce     two-shot: S_r[rows] = bf16(sum over ranks) on every rank.
//   p2p_reduce_scatter S_r[owned rows of r] = bf16(sum); other rows untouched.
//   p2p_all_gather     S_r[owned rows of q] = S_q[owned rows of q] for every q.
//   p2p_oneshot_*      latency path for small n (<= oneshot_max rows): every rank pushes ALL its rows
//                      (and the residual rows it owns) to every peer in one phase, then every rank
//                      reduces every row itself in the same fixed rank order (bit-identical results).
//
// WHY TWO PATHS. Two-shot moves n rows per direction (n/2 partials + n/2 results for tp=2) and needs
// two flag round trips; one-shot moves n*(tp-1) partial rows + the owned residual rows but needs one
// round trip and no second pass. At ~1 MiB (64 tokens x 8192) the round trip (~2 us) dominates, so
// one-shot wins there; at large n the extra bytes dominate and two-shot wins. We chose flags rather
// than a Lamport sentinel protocol: sentinels save the flag store but need the receive buffers reset
// to the sentinel after every use (triple buffering) and a float value reserved as "empty"; flags
// keep the receive path a plain load and cost one 4-byte release store per (CTA, peer).
//
// LAUNCH SHAPE. grid = ctas (1..SM count, <= kMaxCtas; the CTA budget), the SAME on every rank;
// block = kThreads (512: 16 warps, one row per warp at a time in phase 2; any hidden % 8 == 0 fits).
// CTA c of every rank handles slice c of every owner's chunk (rows split evenly over the CTAs), so CTA c
// only ever talks to CTA c of the other ranks ("CTA pairs"); nothing waits on a grid-wide barrier
// (sync_all=1 turns the waits into "every CTA of every peer": the simple three-phase fusion).
//
// BUFFERS (per rank, one cudaMalloc shared by CUDA IPC; table[r*kSlots + k] = rank r's pointer k).
// The slot indices kSlot*, kSlots, kMaxCtas, kMaxTp and kThreads are defined once, in
// cuda/peer_sync.cuh (namespace tw::p2p), which tw/comm/p2p.py reads for its MAX_* / THREADS / SLOT_NAMES:
//   k=0 staging [max_tokens, H]              row-parallel GEMMs write their partial output here
//   k=1 recv    [tp][chunk_max, H]           recv[src][row - chunk_lo]: src's partial of my rows
//   k=2 out     [max_tokens, H]              registered output (out_kind 2 pushes results here)
//   k=3 osum    [2][tp][oneshot_max, H]      one-shot partials, double-buffered by epoch parity
//   k=4 ores    [2][oneshot_max, H]          one-shot residual rows, sent by their owner
//   k=5 flags   [2 phases][kMaxCtas][kMaxTp] uint32 arrival epochs, written by peers
//   state (local device memory, not shared): [0] epoch [1] CTAs done [2] error [3] peer [4] cta [5] phase
//   (tw::sync::kState* in cuda/peer_sync.cuh)
//
// MEMORY ORDERING. The helpers (st_release_sys / ld_acquire_sys, the bounded wait_flag, the call
// epoch read_call_epoch / finish_call) live in cuda/peer_sync.cuh, shared with the multimem kernel;
// its header comment gives their ordering argument (release cumulativity, acquire + __syncthreads(),
// why every rank uses the same epoch for the same call). On top of them, here: a "signal" is every
// thread's data stores (weak st.global, to a peer over NVLink), then __syncthreads(), then thread j
// stores the call's epoch to peer j's flag with st_release_sys; a wait is ld_acquire_sys on my flags
// until they reach the epoch, then __syncthreads(), after which the whole block observes the data.
// Reuse safety, without a barrier at the end of two-shot calls:
//  - recv: peer q writes my recv in call k+1 only after finishing call k, i.e. after receiving the
//    phase-2 signal of every one of my CTAs for call k, each sent after that CTA's last recv read.
//  - staging (phase-2 pushes of results): q pushes into my staging rows of q's chunk only after my
//    phase-1 signal of the same call, i.e. after my CTA pushed (read) those rows; my GEMM for the next
//    call starts only after my kernel has received every incoming row.
//  - one-shot areas: parity double-buffered. q writes parity(k+2) only after finishing k+1, which
//    needed my phase-1 signal of k+1, which my kernel k+1 sent after my whole kernel k had finished.
//  - flags: a peer is at most one call ahead, so a wait passes on (flag - epoch) >= 0 (wrap-safe).
//  - pull (p2p_ar_norm_pull): my CTA c reads q's staging rows of my chunk, slice c, only after q's
//    CTA c signalled phase 1 of the call (q's kernel started, so q's GEMM output is complete), and
//    signals phase 2 only after those reads; q's kernel, so q's next GEMM, waits for that signal from
//    every one of my CTAs. Only the owner reads (or rewrites, with its results) a staging row of its
//    chunk, so the pushed results never overwrite a row another rank still reads.
// The reduce-scatter alone ends with an empty phase-2 signal (a barrier) so recv is free afterwards;
// the all-gather alone starts with an empty phase-1 signal so it never writes into a peer's staging
// rows before that peer has reached the call.
//
// FAILURE. Each wait spins at most timeout_ns (globaltimer, tw::sync::wait_flag polling every 1024
// spins); on timeout it records (peer, cta, phase) in state[2..5] and the kernel returns; other CTAs
// see state[2] != 0 and return too. The Python side (P2PComm.check) raises "rank R did not arrive
// within N s". After that the object is unusable.
#include "common.cuh"
#include "peer_sync.cuh"
#include "row_norm.cuh"

// TW_TP: the TP degree as a compile-time constant (tw/comm/p2p.py compiles with -DTW_TP=<tp>), so
// the loops over ranks unroll and peer pointers stay in registers; 0 = read it from the arguments at
// run time. Compiling it in cut the phase-2 row loop of p2p_all_reduce from 1646 to ~520 SASS
// instructions per 2-row iteration (TP=2): the loop was instruction-bound (experiments/NOTES.md).
#ifndef TW_TP
#define TW_TP 0
#endif
#define TP_OF(a) (TW_TP > 0 ? TW_TP : (a).tp)

namespace {

// The layout constants (one definition, cuda/peer_sync.cuh; tw/comm/p2p.py reads the same lines).
using tw::p2p::kMaxCtas;
using tw::p2p::kMaxTp;
using tw::p2p::kSlotFlags;
using tw::p2p::kSlotOres;
using tw::p2p::kSlotOsum;
using tw::p2p::kSlotOut;
using tw::p2p::kSlotRecv;
using tw::p2p::kSlots;
using tw::p2p::kSlotStaging;
using tw::p2p::kThreads;
using tw::sync::kStateCta;
using tw::sync::kStatePeer;
using tw::sync::kStatePhase;

enum Mode {
  kAllReduce = 0,
  kReduceScatter = 1,
  kAllGather = 2,
  kArNorm = 3,
  kArNormReplicated = 4,
  kOneshotAllReduce = 5,
  kOneshotArNorm = 6,
  kArNormPull = 7,
  kNormOnly = 8,
};

struct Args {
  const unsigned long long* table;
  int rank, tp, hidden, start, end, chunk_max, oneshot_max;
  __nv_bfloat16* residual;
  const __nv_bfloat16* weight;
  float eps;
  __nv_bfloat16* out;
  int out_kind;  // 0: out is private memory, 1: out is the staging buffer itself, 2: registered out
  int sync_all;
  unsigned long long timeout_ns;
  unsigned int* state;
  unsigned long long link_ns;  // emulated link (0: off): the floor of each phase, see link_floor()
};

template <typename T>
TW_DEVICE T* ptr(const Args& a, int rank, int slot) {
  return reinterpret_cast<T*>(a.table[rank * kSlots + slot]);
}

TW_DEVICE unsigned int* flag(unsigned int* flags, int phase, int cta, int src) {
  return flags + (phase * kMaxCtas + cta) * kMaxTp + src;
}

// Rows of [lo, hi) that slice `i` of `parts` covers (even split, the first n % parts get one more).
TW_DEVICE void split(int lo, int hi, int parts, int i, int& a, int& b) {
  const int n = hi - lo, base = n / parts, rem = n % parts;
  a = lo + i * base + min(i, rem);
  b = a + base + (i < rem ? 1 : 0);
}

// Same definition as tw.comm.owned_rows.
TW_DEVICE void owned(int start, int end, int r, int tp, int& lo, int& hi) {
  const int chunk = (end - start + tp - 1) / tp;
  lo = min(end, start + r * chunk);
  hi = min(end, lo + chunk);
}

// dst[0:n) = src[0:n) in 16-byte vectors, 8 loads in flight per thread before the stores.
TW_DEVICE void copy_vec(uint4* dst, const uint4* src, long long n) {
  constexpr int U = 8;
  const long long stride = blockDim.x;
  long long i = threadIdx.x;
  for (; i + (U - 1) * stride < n; i += U * stride) {
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) v[u] = src[i + u * stride];
#pragma unroll
    for (int u = 0; u < U; ++u) dst[i + u * stride] = v[u];
  }
  for (; i < n; i += stride) dst[i] = src[i];
}

// Signal the peers' CTA `cta` that this CTA's data for `phase` is in their memory.
TW_DEVICE void signal(const Args& a, int phase, unsigned int epoch) {
  __syncthreads();
  const int j = threadIdx.x;
  if (j < TP_OF(a) && j != a.rank)
    tw::sync::st_release_sys(flag(ptr<unsigned int>(a, j, kSlotFlags), phase, blockIdx.x, a.rank), epoch);
}

// EMULATED LINK (tw/comm/emulation.py, --emulate-link-gbps; link_ns = 0 everywhere else). An emulated rank's
// peers are stand-ins whose arrival flags are preset, so a phase would end as soon as this rank's own
// SMs are done. With link_ns > 0 it ends no earlier than (phase + 1) * link_ns after this CTA started:
// the time a link of the given rate needs to carry one phase's bytes each way, (tp - 1) ceil(n / tp)
// rows (computed by the host). One thread sleeps; the wait's closing __syncthreads() holds the rest.
TW_DEVICE void link_floor(const Args& a, int phase, unsigned long long t0) {
  if (a.link_ns == 0 || threadIdx.x != 0) return;
  const unsigned long long until = t0 + (phase + 1) * a.link_ns;
  while (tw::sync::globaltimer() < until) __nanosleep(200);
}

// Wait until the peers' CTA `cta` (or all their CTAs with sync_all) signalled `phase` of this call.
// Returns false on timeout or when another CTA already failed (the caller must return).
TW_DEVICE bool wait(const Args& a, int phase, unsigned int epoch, unsigned long long t0) {
  link_floor(a, phase, t0);
  __shared__ int s_fail;
  if (threadIdx.x == 0) s_fail = 0;
  __syncthreads();
  unsigned int* flags = ptr<unsigned int>(a, a.rank, kSlotFlags);
  const int num_ctas = a.sync_all ? gridDim.x : 1;
  for (int t = threadIdx.x; t < num_ctas * TP_OF(a); t += blockDim.x) {
    const int src = t % TP_OF(a), cta = a.sync_all ? t / TP_OF(a) : blockIdx.x;
    if (src == a.rank) continue;
    // Poll the error word and the clock every 1024 spins; the first CTA to time out records where.
    // After a failure the thread goes on to its next flag (whose wait then ends at its first poll).
    tw::sync::wait_flag<1024>(flag(flags, phase, cta, src), epoch, a.timeout_ns, a.state, [&](bool timed_out) {
      if (timed_out && tw::sync::claim_error(a.state)) {
        a.state[kStatePeer] = src;
        a.state[kStateCta] = blockIdx.x;
        a.state[kStatePhase] = phase;
        __threadfence_system();
      }
      s_fail = 1;
    });
  }
  __syncthreads();
  return s_fail == 0;
}

// Where source k's partial of `row` lives in phase 2: my own staging row, the row a peer pushed into
// my recv area (two-shot) or into my one-shot area. In the replicated order the only source is my
// staging row, which already holds the bf16 sum its owner pushed.
template <int MODE>
TW_DEVICE const uint4* source_row(const Args& a, int k, int row, int chunk_lo, unsigned int parity) {
  constexpr bool oneshot = MODE == kOneshotAllReduce || MODE == kOneshotArNorm;
  const long long H = a.hidden;
  const __nv_bfloat16* p;
  if (MODE == kArNormReplicated || MODE == kNormOnly || k == a.rank) {
    p = ptr<__nv_bfloat16>(a, a.rank, kSlotStaging) + row * H;
  } else if (MODE == kArNormPull) {  // the peer's own staging row, read over NVLink
    p = ptr<__nv_bfloat16>(a, k, kSlotStaging) + row * H;
  } else if (oneshot) {
    p = ptr<__nv_bfloat16>(a, a.rank, kSlotOsum) +
        (((long long)parity * TP_OF(a) + k) * a.oneshot_max + (row - a.start)) * H;
  } else {
    p = ptr<__nv_bfloat16>(a, a.rank, kSlotRecv) + ((long long)k * a.chunk_max + (row - chunk_lo)) * H;
  }
  return reinterpret_cast<const uint4*>(p);
}

// Phase-2 row work for rows [a_row, b_row): the ones this rank owns (two-shot) or all (one-shot).
// MODE picks what is read, what is computed and where results go.
//
// ONE WARP PER ROW. Warp w of the CTA takes rows a_row + w, a_row + w + 16, ...; lane l takes the
// 16-byte columns l, l + 32, ... of its row. Nothing waits on a block barrier, so the 16 warps drift
// apart and one warp's loads overlap another's arithmetic and stores. (The previous layout, a block
// per 2 rows, barriered every row pair for the norm's sum and was limited to ~7-11 GB/s per CTA:
// experiments/NOTES.md.) A row is too long for a warp's registers, so the norm takes two passes:
//   pass 1: h = (S_0 + ... + S_{tp-1}) + residual in fp32, in rank order, kStep vectors per lane per
//           step with every source's load issued before any is used; residual <- bf16(h); the sum of
//           squares is taken of bf16(h), the value the residual stream holds;
//   pass 2: the lane reads back its own residual columns (its own stores: program order makes them
//           visible) and the weight, y = bf16(h) * rsqrt(mean + eps) * w, stores y locally and pushes it.
// Without a norm (all-reduce, reduce-scatter) pass 1 stores the bf16 sum and there is no pass 2.
constexpr int kStep = tw::rownorm::step_for_tp(TW_TP);  // cuda/row_norm.cuh: part of the arithmetic
constexpr int kSources = TW_TP > 0 ? TW_TP : kMaxTp;  // compile-time bound on the sources

// One step of pass 1 for columns c0, c0 + 32, ... (N of them, all < H8): returns the sum of squares.
template <int MODE, int N>
TW_DEVICE float pass1_step(const uint4* const (&src)[kSources], int num_src, const uint4* res_in, uint4* res_row,
                           uint4* stage_row, uint4* const (&peer_rows)[kSources], int num_peers, int c0) {
  constexpr bool norm = MODE == kArNorm || MODE == kArNormReplicated || MODE == kOneshotArNorm ||
                        MODE == kArNormPull || MODE == kNormOnly;
  uint4 raw[kSources][N], rr[N];
#pragma unroll
  for (int s = 0; s < N; ++s) {
#pragma unroll
    for (int k = 0; k < kSources; ++k)
      if (k < num_src) raw[k][s] = src[k][c0 + 32 * s];
    if (norm) rr[s] = res_in[c0 + 32 * s];
  }
  float ss = 0.f;
#pragma unroll
  for (int s = 0; s < N; ++s) {
    const int col = c0 + 32 * s;
    float acc[8];
    tw::rownorm::sum_sources<kSources, N>(raw, s, num_src, acc);
    if (!norm) {
      const uint4 v = tw::pack8(acc);
      stage_row[col] = v;
      if (MODE == kAllReduce) {  // the result to every peer's staging too
#pragma unroll
        for (int j = 0; j < kSources - 1; ++j)
          if (j < num_peers) peer_rows[j][col] = v;
      }
      continue;
    }
    res_row[col] = tw::rownorm::add_residual(acc, rr[s], ss);
  }
  return ss;
}

// One step of pass 2 for N columns: y = r * rinv * w from the residual row r this lane just stored.
template <int MODE, int N>
TW_DEVICE void pass2_step(const uint4* w_vec, const uint4* res_row, uint4* out_row, uint4* const (&peer_rows)[kSources],
                          int num_peers, int c0, float rinv) {
  uint4 hv[N], wv[N];
#pragma unroll
  for (int s = 0; s < N; ++s) {
    hv[s] = res_row[c0 + 32 * s];
    wv[s] = __ldg(w_vec + c0 + 32 * s);
  }
#pragma unroll
  for (int s = 0; s < N; ++s) {
    const int col = c0 + 32 * s;
    const uint4 y = tw::rownorm::scale(hv[s], wv[s], rinv);
    out_row[col] = y;
    if (MODE == kArNorm || MODE == kArNormPull) {  // normed rows to every peer
#pragma unroll
      for (int j = 0; j < kSources - 1; ++j)
        if (j < num_peers) peer_rows[j][col] = y;
    }
  }
}

template <int MODE>
TW_DEVICE void warp_rows(const Args& a, int a_row, int b_row, int chunk_lo, unsigned int parity) {
  constexpr bool norm = MODE == kArNorm || MODE == kArNormReplicated || MODE == kOneshotArNorm ||
                        MODE == kArNormPull || MODE == kNormOnly;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
  const int H8 = a.hidden / 8, me = a.rank;
  const int full = H8 / (32 * kStep) * (32 * kStep);  // columns covered by whole steps of every lane
  const long long H = a.hidden;
  constexpr bool fused = MODE == kArNorm || MODE == kArNormPull;
  const int num_src = MODE == kArNormReplicated || MODE == kNormOnly ? 1 : TP_OF(a);
  const int num_peers = MODE == kAllReduce || fused ? TP_OF(a) - 1 : 0;  // who gets pushed results
  const int slot = fused && a.out_kind == 2 ? kSlotOut : kSlotStaging;  // their staging, or registered out
  const uint4* w_vec = reinterpret_cast<const uint4*>(a.weight);
  int own_lo, own_hi;
  owned(a.start, a.end, me, TP_OF(a), own_lo, own_hi);

  for (int row = a_row + warp; row < b_row; row += num_warps) {
    const uint4* src[kSources];
#pragma unroll
    for (int k = 0; k < kSources; ++k) src[k] = k < num_src ? source_row<MODE>(a, k, row, chunk_lo, parity) : nullptr;
    uint4* stage_row = reinterpret_cast<uint4*>(ptr<__nv_bfloat16>(a, me, kSlotStaging) + row * H);
    uint4* res_row = reinterpret_cast<uint4*>(a.residual + row * H);
    const uint4* res_in = res_row;
    if (MODE == kOneshotArNorm && (row < own_lo || row >= own_hi))  // only the owner has this row's residual
      res_in = reinterpret_cast<const uint4*>(ptr<__nv_bfloat16>(a, me, kSlotOres) +
                                              ((long long)parity * a.oneshot_max + (row - a.start)) * H);
    // Where results are pushed: the peers' staging rows (all-reduce) or output rows (fused), peers in the
    // order me+1, me+2, ... so the loop has no "skip myself" branch.
    uint4* peer_rows[kSources];
#pragma unroll
    for (int k = 0; k < kSources; ++k)
      peer_rows[k] = k + 1 < TP_OF(a) ? reinterpret_cast<uint4*>(ptr<__nv_bfloat16>(a, (me + 1 + k) % TP_OF(a), slot) + row * H)
                                      : nullptr;
    float ss = 0.f;
    for (int c0 = lane; c0 < full; c0 += 32 * kStep)
      ss += pass1_step<MODE, kStep>(src, num_src, res_in, res_row, stage_row, peer_rows, num_peers, c0);
    for (int c0 = full + lane; c0 < H8; c0 += 32)
      ss += pass1_step<MODE, 1>(src, num_src, res_in, res_row, stage_row, peer_rows, num_peers, c0);
    if (!norm) continue;
    const float rinv = rsqrtf(tw::warp_sum(ss) / a.hidden + a.eps);
    uint4* out_row = reinterpret_cast<uint4*>(a.out + row * H);
    for (int c0 = lane; c0 < full; c0 += 32 * kStep) pass2_step<MODE, kStep>(w_vec, res_row, out_row, peer_rows, num_peers, c0, rinv);
    for (int c0 = full + lane; c0 < H8; c0 += 32) pass2_step<MODE, 1>(w_vec, res_row, out_row, peer_rows, num_peers, c0, rinv);
  }
}

template <int MODE>
__device__ void run(const Args& a) {
  __shared__ unsigned int s_epoch;
  __shared__ unsigned long long s_t0;  // when this CTA started (the emulated link's reference)
  if (threadIdx.x == 0) s_t0 = tw::sync::globaltimer();
  const int me = a.rank, c = blockIdx.x, ctas = gridDim.x, H = a.hidden;
  const unsigned int epoch = tw::sync::read_call_epoch(a.state, s_epoch), parity = epoch & 1u;
  const bool oneshot = MODE == kOneshotAllReduce || MODE == kOneshotArNorm;
  __nv_bfloat16* stage_me = ptr<__nv_bfloat16>(a, me, kSlotStaging);

  if (MODE == kNormOnly) {  // decomposition: the owner's row work alone, nothing sent or awaited
    int lo, hi, ra, rb;
    owned(a.start, a.end, me, TP_OF(a), lo, hi);
    split(lo, hi, ctas, c, ra, rb);
    warp_rows<MODE>(a, ra, rb, lo, parity);
    tw::sync::finish_call(a.state, epoch);
    return;
  }

  // ---- Phase 1: push partials to their reducer(s), then signal. ----
  if (oneshot) {
    int ra, rb;
    split(a.start, a.end, ctas, c, ra, rb);
    int own_lo, own_hi;
    owned(a.start, a.end, me, TP_OF(a), own_lo, own_hi);
    const int oa = max(ra, own_lo), ob = min(rb, own_hi);
    for (int k = 1; k < TP_OF(a); ++k) {
      const int j = (me + k) % TP_OF(a);
      __nv_bfloat16* dst = ptr<__nv_bfloat16>(a, j, kSlotOsum) +
                           (((long long)parity * TP_OF(a) + me) * a.oneshot_max + (ra - a.start)) * H;
      copy_vec(reinterpret_cast<uint4*>(dst), reinterpret_cast<const uint4*>(stage_me + (long long)ra * H),
               (long long)(rb - ra) * H / 8);
      if (MODE == kOneshotArNorm && oa < ob) {
        __nv_bfloat16* rdst = ptr<__nv_bfloat16>(a, j, kSlotOres) +
                              ((long long)parity * a.oneshot_max + (oa - a.start)) * H;
        copy_vec(reinterpret_cast<uint4*>(rdst), reinterpret_cast<const uint4*>(a.residual + (long long)oa * H),
                 (long long)(ob - oa) * H / 8);
      }
    }
  } else if (MODE != kAllGather && MODE != kArNormPull) {  // pull: phase 1 only says "my staging is ready"
    for (int k = 1; k < TP_OF(a); ++k) {
      const int j = (me + k) % TP_OF(a);
      int lo, hi, ra, rb;
      owned(a.start, a.end, j, TP_OF(a), lo, hi);
      split(lo, hi, ctas, c, ra, rb);
      __nv_bfloat16* dst = ptr<__nv_bfloat16>(a, j, kSlotRecv) + ((long long)me * a.chunk_max + (ra - lo)) * H;
      copy_vec(reinterpret_cast<uint4*>(dst), reinterpret_cast<const uint4*>(stage_me + (long long)ra * H),
               (long long)(rb - ra) * H / 8);
    }
  }
  signal(a, 0, epoch);
  if (!wait(a, 0, epoch, s_t0)) return;

  // ---- Phase 2: reduce (+ add + norm) the rows this CTA is responsible for, push results. ----
  int lo, hi, ra, rb;
  if (oneshot) {
    lo = a.start;
    hi = a.end;
  } else {
    owned(a.start, a.end, me, TP_OF(a), lo, hi);
  }
  split(lo, hi, ctas, c, ra, rb);
  if (MODE == kAllGather) {
    for (int k = 1; k < TP_OF(a); ++k) {
      const int j = (me + k) % TP_OF(a);
      copy_vec(reinterpret_cast<uint4*>(ptr<__nv_bfloat16>(a, j, kSlotStaging) + (long long)ra * H),
               reinterpret_cast<const uint4*>(stage_me + (long long)ra * H), (long long)(rb - ra) * H / 8);
    }
  } else if (MODE == kArNormReplicated) {
    // The owner first sends s = bf16(sum) of its rows to every rank's staging (the all-reduce's row
    // work), then does its own add + norm of them; the same warp and lane read back what they wrote.
    warp_rows<kAllReduce>(a, ra, rb, lo, parity);
    warp_rows<kArNormReplicated>(a, ra, rb, lo, parity);
  } else {
    warp_rows<MODE>(a, ra, rb, lo, parity);
  }

  if (!oneshot) {
    signal(a, 1, epoch);
    if (!wait(a, 1, epoch, s_t0)) return;
    // ---- After the gather: finish the rows other ranks produced. ----
    if ((MODE == kArNorm || MODE == kArNormPull) && a.out_kind == 0) {
      for (int k = 1; k < TP_OF(a); ++k) {
        const int j = (me + k) % TP_OF(a);
        int jl, jh, ja, jb;
        owned(a.start, a.end, j, TP_OF(a), jl, jh);
        split(jl, jh, ctas, c, ja, jb);
        copy_vec(reinterpret_cast<uint4*>(a.out + (long long)ja * H),
                 reinterpret_cast<const uint4*>(stage_me + (long long)ja * H), (long long)(jb - ja) * H / 8);
      }
    } else if (MODE == kArNormReplicated) {
      for (int k = 1; k < TP_OF(a); ++k) {
        const int j = (me + k) % TP_OF(a);
        int jl, jh, ja, jb;
        owned(a.start, a.end, j, TP_OF(a), jl, jh);
        split(jl, jh, ctas, c, ja, jb);
        warp_rows<kArNormReplicated>(a, ja, jb, jl, parity);
      }
    }
  }

  // ---- Epoch bump: the last CTA to get here advances the per-rank call counter. ----
  tw::sync::finish_call(a.state, epoch);
}

}  // namespace

#define TW_P2P_PARAMS                                                                                  \
  const unsigned long long *table, int rank, int tp, int hidden, int start, int end, int chunk_max,    \
      int oneshot_max, __nv_bfloat16 *residual, const __nv_bfloat16 *weight, float eps,                \
      __nv_bfloat16 *out, int out_kind, int sync_all, unsigned long long timeout_ns, unsigned int *state, \
      unsigned long long link_ns
#define TW_P2P_ARGS                                                                                     \
  Args{table, rank,     tp,  hidden,   start,    end,        chunk_max, oneshot_max,                    \
       residual, weight, eps, out, out_kind, sync_all, timeout_ns, state, link_ns}

// TW_CLUSTER: CTAs per thread-block cluster (tw/comm/p2p.py compiles -DTW_CLUSTER=2 with TW_P2P_CLUSTER=2).
// A cluster's CTAs are co-scheduled on SMs of one GPC, so the kernel takes its SMs in pairs; held SMs
// taken in pairs cost cuBLAS's 2-CTA-cluster GEMMs beside them about a quarter less at 16 SMs
// (experiments/NOTES.md, "The cluster hypothesis"). Nothing else changes: CTA c still talks to CTA c of
// every peer, and the grid (the CTA budget) must be a multiple of TW_CLUSTER (checked in Python).
#ifndef TW_CLUSTER
#define TW_CLUSTER 1
#endif
#if TW_CLUSTER > 1
#define TW_CLUSTER_DIMS __cluster_dims__(TW_CLUSTER, 1, 1)
#else
#define TW_CLUSTER_DIMS
#endif

#define TW_P2P_KERNELS(NAME, MODE) \
  extern "C" __global__ void __launch_bounds__(kThreads, 1) TW_CLUSTER_DIMS NAME(TW_P2P_PARAMS) { run<MODE>(TW_P2P_ARGS); }

TW_P2P_KERNELS(p2p_all_reduce, kAllReduce)
TW_P2P_KERNELS(p2p_reduce_scatter, kReduceScatter)
TW_P2P_KERNELS(p2p_all_gather, kAllGather)
TW_P2P_KERNELS(p2p_ar_norm, kArNorm)
TW_P2P_KERNELS(p2p_ar_norm_pull, kArNormPull)
TW_P2P_KERNELS(p2p_norm_only, kNormOnly)
TW_P2P_KERNELS(p2p_ar_norm_replicated, kArNormReplicated)
TW_P2P_KERNELS(p2p_oneshot_all_reduce, kOneshotAllReduce)
TW_P2P_KERNELS(p2p_oneshot_ar_norm, kOneshotArNorm)

// The start-up probe: one thread stores `value` into a peer's memory with a system-scope release.
extern "C" __global__ void p2p_probe(unsigned int* remote, unsigned int value) {
  if (threadIdx.x == 0 && blockIdx.x == 0) tw::sync::st_release_sys(remote, value);
}
