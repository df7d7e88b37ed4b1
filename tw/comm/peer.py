"""What the two peer transports share (p2p: our kernels over CUDA-IPC pointers; ce: copy engines and
stream memory operations): the argument checks, the registered buffer's row views and closing it.

A subclass sets self.buf (a tw.comm.ipc.SharedBuffer, or a tw.comm.standin.StandInBuffer for an emulated
rank), self.hidden, self.max_tokens, self.dtype and self.num_sms before it uses these. The layout
constants both share with their kernels are in tw/comm/layout.py.
"""
from __future__ import annotations


class PeerComm:
    """Base of P2PComm and CeComm (see the module docstring)."""

    @classmethod
    def check_args(cls, hidden: int, max_tokens: int, dtype) -> None:
        """The buffer arguments every peer transport needs: bf16 rows of a positive multiple of 8 elements."""
        if str(dtype) != "bfloat16":
            raise ValueError(f"{cls.__name__} supports dtype='bfloat16' only, got {dtype!r}")
        if hidden % 8 != 0 or hidden <= 0:
            raise ValueError(f"hidden={hidden} must be a positive multiple of 8 (rows move as 16-byte vectors)")
        if max_tokens <= 0:
            raise ValueError(f"max_tokens={max_tokens} must be positive")

    def close(self) -> None:
        """Close the peers' IPC mappings."""
        if getattr(self, "buf", None) is not None:
            self.buf.close()

    def _view(self, name: str, num_tokens: int):
        return self.buf.rows(name, num_tokens, self.hidden, self.dtype, self.max_tokens)

    def staging(self, num_tokens: int):
        """[num_tokens, hidden] bf16 view of this rank's registered staging buffer (GEMM output)."""
        return self._view("staging", num_tokens)

    def output(self, num_tokens: int):
        """[num_tokens, hidden] bf16 view of the registered output; as `out` of ar_add_norm the owners write
        their results straight into it (no final local copy). Its rows are rewritten by every call."""
        return self._view("out", num_tokens)
