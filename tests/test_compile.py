"""Every cuda/*.cu compiles for sm_90a without a GPU (CI has nvcc but no GPU), and the P2P layout
constants of tw/comm/layout.py are the ones the kernels compile with (cuda/peer_layout.cuh)."""
import re
import shutil
import subprocess

import pytest

from tw.runtime import kernels

needs_nvcc = pytest.mark.skipif(not (shutil.which("nvcc") or __import__("os").path.exists("/usr/local/cuda/bin/nvcc")),
                                reason="nvcc not installed")


@needs_nvcc
@pytest.mark.parametrize("name", kernels.all_kernel_names())
def test_kernel_compiles_for_sm90a(name):
    path = kernels.compile(name, "sm_90a")
    assert path.stat().st_size > 0


@needs_nvcc
def test_cache_key_changes_with_defines_and_arch():
    a = kernels.cache_key("rmsnorm", None, "sm_90a", "cubin")
    assert a != kernels.cache_key("rmsnorm", {"X": 1}, "sm_90a", "cubin")
    assert a != kernels.cache_key("rmsnorm", None, "sm_80", "cubin")
    assert a == kernels.cache_key("rmsnorm", None, "sm_90a", "cubin")


def test_unknown_kernel_file_is_a_clear_error():
    with pytest.raises(kernels.KernelBuildError, match="no kernel file cuda/nope.cu"):
        kernels.source_path("nope")


@needs_nvcc
@pytest.mark.parametrize("tp", [2, 4, 8])
def test_p2p_kernels_compile_with_tp_constant(tp):
    assert kernels.compile("ar_norm_p2p", "sm_90a", {"TW_TP": tp}).stat().st_size > 0


# ---- the P2P layout: one definition (cuda/peer_layout.cuh), read by tw/comm/layout.py ----

def test_p2p_constants_come_from_the_layout_header():
    from tw.comm import ce, p2p
    from tw.comm.layout import read_layout
    layout = read_layout()
    assert (ce.MAX_TP, ce.THREADS) == (layout["kMaxTp"], layout["kThreads"])   # the CE transport: the same source
    assert (p2p.MAX_TP, p2p.MAX_CTAS, p2p.NUM_SLOTS, p2p.THREADS) == (
        layout["kMaxTp"], layout["kMaxCtas"], layout["kSlots"], layout["kThreads"])
    # the buffers P2PComm lays out, in pointer-table order (staging = 0 ... flags = 5)
    assert p2p.SLOT_NAMES == ("staging", "recv", "out", "osum", "ores", "flags")
    assert len(p2p.SLOT_NAMES) <= p2p.NUM_SLOTS
    assert p2p.THREADS % 32 == 0 and p2p.THREADS <= 1024


@pytest.mark.parametrize("block,error", [
    ("constexpr int kA = 1;\nconstexpr int kB = 22;  // note\n\n", None),
    ("constexpr int kA = 2 * 128;\n", "only distinct"),                  # an expression: refuse
    ("constexpr int kA = 1;\nconstexpr int kA = 2;\n", "only distinct"),  # a duplicate
    ("#define kA 1\n", "only distinct"),
])
def test_p2p_layout_parser_is_strict(tmp_path, block, error):
    from tw.comm import layout
    header = tmp_path / "h.cuh"
    header.write_text(f"// x\n// TW_P2P_LAYOUT_BEGIN\n{block}// TW_P2P_LAYOUT_END\n")
    if error is None:
        assert layout.read_layout(header) == {"kA": 1, "kB": 22}
    else:
        with pytest.raises(RuntimeError, match=error):
            layout.read_layout(header)


def test_p2p_layout_parser_needs_the_markers(tmp_path):
    from tw.comm import layout
    header = tmp_path / "h.cuh"
    header.write_text("constexpr int kA = 1;\n")
    with pytest.raises(RuntimeError, match="TW_P2P_LAYOUT_BEGIN"):
        layout.read_layout(header)


def _nvcc_static_asserts(tmp_path, values: dict) -> subprocess.CompletedProcess:
    """Compile a file that includes cuda/peer_layout.cuh and static_asserts tw::p2p::<name> == value."""
    src = tmp_path / "layout_check.cu"
    src.write_text('#include "peer_layout.cuh"\n' + "".join(
        f'static_assert(tw::p2p::{k} == {v}, "{k} != {v}");\n' for k, v in values.items()))
    cmd = [kernels.nvcc(), "-cubin", "-gencode=arch=compute_90a,code=sm_90a", *kernels.NVCC_FLAGS,
           f"-I{kernels.CUDA_DIR}", "-o", str(tmp_path / "layout_check.cubin"), str(src)]
    return subprocess.run(cmd, capture_output=True, text=True)


@needs_nvcc
def test_p2p_layout_python_read_is_what_nvcc_compiles(tmp_path):
    """nvcc sees the values tw/comm/layout.py read from the header (the parser and the C++ agree), and
    the check is real: a wrong value fails to compile."""
    from tw.comm.layout import read_layout
    layout = read_layout()
    ok = _nvcc_static_asserts(tmp_path, layout)
    assert ok.returncode == 0, ok.stderr
    wrong = _nvcc_static_asserts(tmp_path, {**layout, "kMaxCtas": layout["kMaxCtas"] + 1})
    assert wrong.returncode != 0 and "kMaxCtas" in wrong.stderr


@needs_nvcc
@pytest.mark.parametrize("tp", [None, 2])
def test_p2p_kernels_launch_bounds_are_python_threads(tp):
    """Every collective kernel of the compiled module is built for exactly p2p.THREADS threads per CTA
    (__launch_bounds__(kThreads, 1) -> .maxntid in the PTX), the block size P2PComm launches."""
    from tw.comm import p2p
    ptx = kernels.compile("ar_norm_p2p", "sm_90a", {"TW_TP": tp} if tp else None, kind="ptx").read_text()
    entries = re.findall(r"\.entry (p2p_\w+)\((.*?)\{", ptx, re.S)
    names = {name for name, _ in entries}
    assert {"p2p_all_reduce", "p2p_reduce_scatter", "p2p_all_gather", "p2p_ar_norm", "p2p_ar_norm_replicated",
            "p2p_oneshot_all_reduce", "p2p_oneshot_ar_norm", "p2p_probe"} <= names
    for name, head in entries:
        if name == "p2p_probe":
            continue
        assert f".maxntid {p2p.THREADS}, 1, 1" in head, (name, head[-200:])


@needs_nvcc
def test_p2p_cluster_build_declares_2_cta_clusters_and_the_probe_does_not(monkeypatch):
    """TW_P2P_CLUSTER=2 (cluster=2): every collective kernel carries .reqnctapercluster 2 (launched as
    2-CTA clusters); the one-CTA probe stays a plain kernel. Other values are refused."""
    from tw.comm import p2p
    monkeypatch.setenv("TW_P2P_CLUSTER", "2")
    monkeypatch.delenv("TW_P2P_RUNTIME_TP", raising=False)
    options = p2p.options_from_env()
    assert options == {"cluster": 2, "runtime_tp": False}
    ptx = kernels.compile("ar_norm_p2p", "sm_90a", p2p.kernel_defines(2, **options), kind="ptx").read_text()
    for name, head in re.findall(r"\.entry (p2p_\w+)\((.*?)\{", ptx, re.S):
        assert (".reqnctapercluster 2" in head) == (name != "p2p_probe"), (name, head[-200:])
    monkeypatch.setenv("TW_P2P_CLUSTER", "4")
    with pytest.raises(ValueError, match="expected 1 .* or 2"):
        p2p.options_from_env()


def test_sync_helpers_are_defined_once():
    """The acquire/release and timeout helpers live in cuda/peer_sync.cuh only; both kernels include it."""
    asms = ('asm volatile("ld.acquire.sys', 'asm volatile("st.release.sys', 'asm volatile("mov.u64 %0, %%globaltimer')
    header = (kernels.CUDA_DIR / "peer_sync.cuh").read_text()
    for needle in asms:
        assert header.count(needle) == 1, needle
    for name in ("ar_norm_p2p", "ar_norm_multimem"):
        src = kernels.source_path(name).read_text()
        assert '#include "peer_sync.cuh"' in src, name
        for needle in asms:
            assert needle not in src, (name, needle)
