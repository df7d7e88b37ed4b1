"""The layout the peer transports share with their kernels, read from ONE source: the
TW_P2P_LAYOUT_BEGIN/END block of cuda/peer_layout.cuh (namespace tw::p2p), which cuda/ar_norm_p2p.cu
(p2p, through peer_sync.cuh) and cuda/ce_norm.cu (ce) include. tw/comm/p2p.py and tw/comm/ce.py import these names; nothing
restates a value by hand.
"""
from __future__ import annotations

from tw.runtime import kernels

LAYOUT_HEADER = kernels.CUDA_DIR / "peer_layout.cuh"


def read_layout(path=LAYOUT_HEADER) -> dict[str, int]:
    """The P2P layout constants, {'kMaxTp': 8, ...}, from the TW_P2P_LAYOUT_BEGIN/END block of
    cuda/peer_layout.cuh. Every line there must be `constexpr int kName = <decimal>;` (a // comment may
    follow); anything else is an error, so an edit the parser does not understand fails at import
    instead of silently diverging from what nvcc compiles."""
    import re
    lines = [line.strip() for line in path.read_text().splitlines()]
    begin, end = "// TW_P2P_LAYOUT_BEGIN", "// TW_P2P_LAYOUT_END"
    if lines.count(begin) != 1 or lines.count(end) != 1 or lines.index(begin) > lines.index(end):
        raise RuntimeError(f"{path}: expected one {begin!r} line, then one {end!r} line")
    values: dict[str, int] = {}
    for line in lines[lines.index(begin) + 1:lines.index(end)]:
        code = line.split("//", 1)[0].strip()
        if not code:
            continue
        m = re.fullmatch(r"constexpr int (k\w+) = (\d+);", code)
        if m is None or m.group(1) in values:
            raise RuntimeError(f"{path}: the layout block allows only distinct `constexpr int kName = N;` "
                               f"lines, got {line.strip()!r}")
        values[m.group(1)] = int(m.group(2))
    return values


# One source for the layout the host and the kernels share: cuda/peer_layout.cuh, read here at import.
# A header rather than -D defines passed from Python: with defines, every compile of
# cuda/ar_norm_p2p.cu (the compile test, experiments, a plain kernels.compile(name)) would have to pass
# them or hit an #error, and a caller that passed its own defines would silently compile another
# layout; with the header every compile gets the one layout with no arguments, kernels.cache_key
# already hashes it, and the strict parser above makes a layout line it cannot read an import error.
# tests/test_compile.py checks that nvcc sees the values read here.
_LAYOUT = read_layout()
MAX_TP = _LAYOUT["kMaxTp"]          # TP ranks at most (flag and probe words per rank)
MAX_CTAS = _LAYOUT["kMaxCtas"]      # CTAs per call at most (flag words per phase and rank)
NUM_SLOTS = _LAYOUT["kSlots"]       # pointer-table entries per rank
THREADS = _LAYOUT["kThreads"]       # threads per CTA: 16 warps, one row each at a time
# Pointer-table slots by index (kSlotStaging = 0 -> "staging", ...): table[r * NUM_SLOTS + k] points at
# buffer SLOT_NAMES[k] of rank r.
_SLOTS = sorted((v, n[len("kSlot"):].lower()) for n, v in _LAYOUT.items() if n.startswith("kSlot") and n != "kSlots")
SLOT_NAMES = tuple(name for _, name in _SLOTS)
if [v for v, _ in _SLOTS] != list(range(len(_SLOTS))) or len(_SLOTS) > NUM_SLOTS:
    raise RuntimeError(f"{LAYOUT_HEADER}: the kSlot* indices must be 0..n-1 with n <= kSlots, got {_LAYOUT}")
