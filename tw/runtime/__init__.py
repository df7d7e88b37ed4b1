"""The runtime under the model: MPI/NCCL bootstrap and user errors (dist), the stalled-rank watchdog and its
shared rank table, the CUDA kernel loader (kernels), CUDA graphs (graph), host/device array helpers (arrays)."""
