"""tw: TokenWeave (arXiv 2505.11329) in CuPy + NCCL + MPI.

Modules, one concept each: config (model presets, shards), dist (MPI/NCCL bootstrap), kernels (the
CUDA loader), ops (GEMM + memory-bound kernels), attention, batch (token layout, A/B split), weights,
layers, model, schedules (the strategies), split (wave-aware split point), comm/ (transports), reference
(float64 model), bench (timing), trace (per-op timelines), results (result files).
"""
__version__ = "0.1.0"
