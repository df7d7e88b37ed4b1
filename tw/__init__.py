"""tw: TokenWeave (arXiv 2505.11329) in CuPy + NCCL + MPI.

Subpackages, bottom up: runtime, ops, model, comm, schedule, serve, measure (the code map is in the
README).

Importing tw under an MPI launcher with several ranks on the machine limits BLAS / OpenMP to one thread
per rank (OMP_NUM_THREADS, OPENBLAS_NUM_THREADS, MKL_NUM_THREADS, BLIS_NUM_THREADS = 1), unless the user
set any of those variables: N ranks x N BLAS threads on N cores made the CPU path crawl.
"""
__version__ = "0.1.0"

import os as _os
import sys as _sys

# Where an MPI launcher puts this process's world rank and the job's size (MPICH/hydra and Intel MPI,
# Open MPI, PMIx, MVAPICH), read before MPI is initialised; and the ranks on this node (hydra, Open MPI).
_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_LOCAL_SIZE_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE")
BLAS_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")


def _env_int(names) -> int | None:
    for name in names:
        try:
            return int(_os.environ[name])
        except (KeyError, ValueError):
            continue
    return None


def launched_by_mpi() -> bool:
    """True when an MPI launcher (mpiexec/mpirun/srun with PMI) started this process."""
    return any(_os.environ.get(v) for v in _RANK_VARS + _SIZE_VARS)


def launcher_rank() -> int:
    """This process's world rank as the launcher's environment says (0 without a launcher)."""
    return _env_int(_RANK_VARS) or 0


def _one_blas_thread_per_rank() -> None:
    """Several ranks on one machine: one BLAS/OpenMP thread each, or their thread pools fight for the cores
    (N ranks x N threads). Only where the user set none of the thread variables; set before NumPy loads
    its BLAS, or (NumPy already imported) through threadpoolctl when it is installed."""
    ranks_here = _env_int(_LOCAL_SIZE_VARS) or _env_int(_SIZE_VARS) or 1
    if ranks_here <= 1 or any(_os.environ.get(v, "").strip() for v in BLAS_THREAD_VARS):
        return
    for var in BLAS_THREAD_VARS:
        _os.environ[var] = "1"
    if "numpy" in _sys.modules:  # its BLAS already read the variables: limit the loaded pools directly
        try:
            from threadpoolctl import threadpool_limits
            threadpool_limits(limits=1)
        except Exception:  # threadpoolctl missing (GPU machines) or unable: the GPU path does not care
            pass


_one_blas_thread_per_rank()
