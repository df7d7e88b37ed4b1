"""How a forward pass is scheduled: the strategies (nccl, nocomm, fused, finegrained, tokenweave), the
wave-aware split point (split), the GEMM-time profile it reads (profile) and the tuned choices (tuned)."""
