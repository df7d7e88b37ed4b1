"""How a forward pass is scheduled: the strategies (nccl, nocomm, fused, finegrained, tokenweave), the
wave-aware split point (split), the GEMM-time profile it reads (profile), the tuned choices (tuned) and
tokenweave's policy, which weighs flags, tuned choices and defaults for every batch (policy)."""
