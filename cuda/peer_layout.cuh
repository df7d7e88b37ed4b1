// The peer transports' layout constants, the one place they are defined (cuda/ar_norm_p2p.cu and
// cuda/ar_norm_multimem.cu through cuda/peer_sync.cuh; cuda/ce_norm.cu directly).
//
// LAYOUT (namespace tw::p2p). The lines between TW_P2P_LAYOUT_BEGIN and TW_P2P_LAYOUT_END are
// also read by tw/comm/layout.py at import (MAX_TP, MAX_CTAS, NUM_SLOTS, THREADS, SLOT_NAMES; the CE
// transport and cuda/ce_norm.cu take kMaxTp and kThreads from here too), so the
// host's allocation, pointer table and launch shape cannot drift from the kernel's. Keep each of those
// lines in the form `constexpr int kName = <decimal>;` (a trailing // comment is fine); the parser
// refuses anything else, and tests/test_compile.py checks that nvcc sees the values Python read.
#pragma once

namespace tw::p2p {
// TW_P2P_LAYOUT_BEGIN
constexpr int kMaxTp = 8;       // TP ranks at most: flag and probe words per source rank
constexpr int kMaxCtas = 256;   // CTAs per call at most: flag words per phase and rank
constexpr int kSlots = 8;       // pointer-table entries per rank: table[r * kSlots + k]
constexpr int kThreads = 512;   // threads per CTA: the kernels' __launch_bounds__ and p2p.py's launch
constexpr int kSlotStaging = 0; // [max_tokens, H] row-parallel GEMM output
constexpr int kSlotRecv = 1;    // [tp][chunk_max, H] peers' partials of my rows
constexpr int kSlotOut = 2;     // [max_tokens, H] registered output
constexpr int kSlotOsum = 3;    // [2][tp][oneshot_max, H] one-shot partials
constexpr int kSlotOres = 4;    // [2][oneshot_max, H] one-shot residual rows
constexpr int kSlotFlags = 5;   // [2 phases][kMaxCtas][kMaxTp] uint32 arrival epochs
// TW_P2P_LAYOUT_END
static_assert(kSlotFlags < kSlots, "the pointer table has room for every slot");
}  // namespace tw::p2p
