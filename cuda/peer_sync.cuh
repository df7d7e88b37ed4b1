// Synchronization between the TP ranks' kernels, shared by cuda/ar_norm_p2p.cu and
// cuda/ar_norm_multimem.cu; the P2P layout constants are in cuda/peer_layout.cuh (included here).
//
// THE SYNC HELPERS (namespace tw::sync) and the ordering argument they carry:
//  - st_release_sys / ld_acquire_sys: a system-scope release store / acquire load of a 32-bit flag
//    (PTX st.release.sys / ld.acquire.sys). Release orders every earlier memory operation of the
//    storing thread before the store, and it is cumulative: operations of other threads that the
//    storer observed first (e.g. the rest of its block's stores, ordered before it by a
//    __syncthreads()) are included. A thread whose acquire load reads that value (or a later one in
//    the flag's modification order) observes all of them; the rest of its block is covered by a
//    __syncthreads() after the wait. System scope because the other side is another GPU (NVLink peer
//    stores, or the NVSwitch's multimem writes). The asm "memory" clobbers keep the compiler from
//    moving ordinary loads and stores across them.
//  - wait_flag: spin with ld_acquire_sys until (flag - target) >= 0 as a signed 32-bit difference, so
//    the counters may wrap (a waiter is never 2^31 behind). Bounded: every kPollEvery spins it gives up
//    when the kernel's error word (state[kStateError]) is already set by another CTA, or when more
//    than timeout_ns of %globaltimer (ns) passed since the wait began. The caller decides what to
//    record: claim_error() lets exactly one CTA of the call fill in the error record
//    state[kStatePeer..kStatePhase].
//  - read_call_epoch / finish_call: the call counter. state[kStateEpoch] (local device memory, not
//    shared) holds the number of finished calls; a call's epoch is that + 1, read once by thread 0 of
//    every CTA at the start. finish_call: the last CTA to count itself in state[kStateCtasDone]
//    resets the count and publishes the epoch. Every CTA reads state[0] before it counts itself, and
//    the last one writes it only after all have counted, so no CTA of a call sees its own bump; the
//    next call, stream-ordered after this kernel, sees it. Every rank making the same sequence of calls
//    therefore uses the same epoch for the same call, with no host state per call (CUDA graphs replay).
#pragma once
#include "common.cuh"

#include "peer_layout.cuh"


namespace tw::sync {

// The per-rank state words (uint32, local device memory) of a P2PComm / MultimemComm.
constexpr int kStateEpoch = 0;     // finished calls
constexpr int kStateCtasDone = 1;  // CTAs of the current call that are done
constexpr int kStateError = 2;     // != 0: a wait timed out; the kernel's CTAs return
constexpr int kStatePeer = 3;      // the error record: which peer (P2P only), CTA and phase
constexpr int kStateCta = 4;
constexpr int kStatePhase = 5;

TW_DEVICE unsigned long long globaltimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

TW_DEVICE void st_release_sys(unsigned int* p, unsigned int v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

TW_DEVICE unsigned int ld_acquire_sys(const unsigned int* p) {
  unsigned int v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// What wait_flag does when it gives up, by default: nothing (the caller handles its false result).
struct NoOp {
  TW_DEVICE void operator()(bool) const {}
};

// Spin until the flag reaches `target` (wrap-safe); true when it did. Every kPollEvery spins (1: every
// spin) it gives up and returns false: when the error word is set (another CTA failed), after calling
// on_give_up(false); when timeout_ns passed, after calling on_give_up(true). One thread; no shared
// memory, no barriers. on_give_up runs at the point where the wait gives up, so a caller's failure
// handling compiles to the same code as the open-coded loops this helper replaced (checked by
// comparing SASS; a result code instead, or the callback taken by value, moved unrelated code of the
// P2P kernels around, so keep the const reference).
template <int kPollEvery, typename OnGiveUp = NoOp>
TW_DEVICE bool wait_flag(const unsigned int* flag, unsigned int target, unsigned long long timeout_ns,
                         const unsigned int* state, const OnGiveUp& on_give_up = {}) {
  static_assert(kPollEvery > 0 && (kPollEvery & (kPollEvery - 1)) == 0, "kPollEvery is a power of two");
  const unsigned long long t0 = globaltimer();
  int spins = 0;
  while (static_cast<int>(ld_acquire_sys(flag) - target) < 0) {
    if ((++spins & (kPollEvery - 1)) == 0) {
      if (*reinterpret_cast<const volatile unsigned int*>(state + kStateError) != 0) {
        on_give_up(false);
        return false;
      }
      if (globaltimer() - t0 > timeout_ns) {
        on_give_up(true);
        return false;
      }
    }
  }
  return true;
}

// True for exactly one caller per failed call: the one that set the error word; it writes the record.
TW_DEVICE bool claim_error(unsigned int* state) {
  return atomicCAS(state + kStateError, 0u, 1u) == 0u;
}

// The call's epoch (finished calls + 1) in every thread; `s_epoch` is a __shared__ word of the
// caller. Contains __syncthreads().
TW_DEVICE unsigned int read_call_epoch(const unsigned int* state, unsigned int& s_epoch) {
  if (threadIdx.x == 0) s_epoch = *reinterpret_cast<const volatile unsigned int*>(state + kStateEpoch) + 1u;
  __syncthreads();
  return s_epoch;
}

// End of the call for this CTA: the last CTA to get here publishes `epoch` as the finished-call count.
// Contains __syncthreads().
TW_DEVICE void finish_call(unsigned int* state, unsigned int epoch) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(state + kStateCtasDone, 1u) == gridDim.x - 1) {
      state[kStateCtasDone] = 0;
      __threadfence();
      atomicExch(state + kStateEpoch, epoch);
    }
  }
}

}  // namespace tw::sync
