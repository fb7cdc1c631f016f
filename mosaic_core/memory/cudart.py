"""Copies of raw byte runs by the GPU's copy engines, without a tensor per run.

Staging a question's retrieved KV is many runs of bytes (one per page and group of layers) between pinned host
pages and device pages. The slab-gather kernel (``mosaic_core.kernels.slab_gather``) moves them with loads and
stores on the SMs, which the question's own kernels need at the same time; ``cudaMemcpyAsync`` hands each run to a
copy engine (DMA) instead. PyTorch has no call for a copy between two raw addresses, and a tensor view per run
costs microseconds of host time each, so this calls the CUDA runtime that PyTorch already loaded, through ctypes.

Off CUDA (and in tests) ``copy_runs_reference`` does the same copies with ``memmove`` on host addresses.
"""

from __future__ import annotations

import ctypes

import numpy as np

CUDA_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: the direction follows from the addresses (unified addressing)


_found: list[ctypes.CDLL] = []  # the runtime, once found (a miss is not kept: CUDA may not be up yet)


def _runtime() -> ctypes.CDLL | None:
    """The CUDA runtime library this process loaded (PyTorch loads it with CUDA), or None."""
    if _found:
        return _found[0]
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart.so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
            copy = lib.cudaMemcpyAsync
        except (OSError, AttributeError):
            continue
        copy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        copy.restype = ctypes.c_int
        strided = lib.cudaMemcpy2DAsync
        strided.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
                            ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]  # fmt: skip
        strided.restype = ctypes.c_int
        lib.cudaGetErrorString.argtypes = [ctypes.c_int]
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        _found.append(lib)
        return lib
    return None


class _MemcpyAttributes(ctypes.Structure):
    """``cudaMemcpyAttributes`` (CUDA 12.8 and later): the order the source is read in, location hints (left
    empty: they matter only for managed memory) and flags."""

    _fields_ = [
        ("src_access_order", ctypes.c_int),
        ("src_loc_type", ctypes.c_int),
        ("src_loc_id", ctypes.c_int),
        ("dst_loc_type", ctypes.c_int),
        ("dst_loc_id", ctypes.c_int),
        ("flags", ctypes.c_uint),
    ]


SRC_ACCESS_ORDER_STREAM = 1  # cudaMemcpySrcAccessOrderStream: the source is read in stream order
PREFER_OVERLAP_WITH_COMPUTE = 1  # cudaMemcpyFlagPreferOverlapWithCompute


def runtime_version() -> int:
    """The loaded CUDA runtime's version (12080 for 12.8), or 0 when none is loaded."""
    lib = _runtime()
    if lib is None:
        return 0
    version = ctypes.c_int(0)
    lib.cudaRuntimeGetVersion(ctypes.byref(version))
    return version.value


# The runtime's version, once it is seen to have cudaMemcpyBatchAsync (a miss is not kept).
_batch_runtime: list[int] = []


def batch_available() -> bool:
    """Whether ``copy_batch`` can run: the runtime is 12.8 or later, which has ``cudaMemcpyBatchAsync``."""
    if not _batch_runtime and (version := runtime_version()) >= 12080 and hasattr(_runtime(), "cudaMemcpyBatchAsync"):
        _batch_runtime.append(version)
    return bool(_batch_runtime)


def copy_batch(runs: np.ndarray, stream: int, *, prefer_overlap: bool = False) -> None:
    """Queues every row ``(src, dst, nbytes)`` of ``runs`` on ``stream`` in one ``cudaMemcpyBatchAsync`` call (the
    runs of one batch land in no set order among themselves, so they must not overlap); ``prefer_overlap`` asks the
    driver to favour overlap with kernels running at the same time. Raises RuntimeError naming CUDA's error.

    The call's arguments changed in CUDA 13 (the index of a failed copy went), so they follow the runtime's version.
    """
    lib = _runtime()
    if lib is None or not batch_available():
        raise RuntimeError("cudaMemcpyBatchAsync needs a CUDA runtime of 12.8 or later loaded in this process")
    count = len(runs)
    if not count:
        return
    table = np.ascontiguousarray(runs, dtype=np.uint64)
    srcs, dsts, sizes = (np.ascontiguousarray(table[:, i]) for i in range(3))
    attributes = _MemcpyAttributes(SRC_ACCESS_ORDER_STREAM, 0, 0, 0, 0, PREFER_OVERLAP_WITH_COMPUTE * prefer_overlap)
    attribute_from = (ctypes.c_size_t * 1)(0)
    pointer = ctypes.c_void_p
    head = (pointer(dsts.ctypes.data), pointer(srcs.ctypes.data), pointer(sizes.ctypes.data), ctypes.c_size_t(count),
            ctypes.byref(attributes), attribute_from, ctypes.c_size_t(1))  # fmt: skip
    failed = ctypes.c_size_t(count)
    if _batch_runtime[0] >= 13000:
        status = lib.cudaMemcpyBatchAsync(*head, pointer(stream))
    else:
        status = lib.cudaMemcpyBatchAsync(*head, ctypes.byref(failed), pointer(stream))
    if status:
        which = f" (copy {failed.value})" if failed.value < count else ""
        raise RuntimeError(
            f"cudaMemcpyBatchAsync of {count} runs failed{which}: {lib.cudaGetErrorString(status).decode()}"
        )


def available() -> bool:
    """Whether runs can go to the copy engines: the CUDA runtime is loaded in this process."""
    return _runtime() is not None


def copy_runs(runs: np.ndarray, stream: int) -> None:
    """Queues ``cudaMemcpyAsync(dst, src, nbytes)`` on ``stream`` (a ``cudaStream_t`` handle) for each row
    ``(src, dst, nbytes)`` of ``runs``; raises RuntimeError naming CUDA's error when one is refused."""
    lib = _runtime()
    if lib is None:
        raise RuntimeError("the CUDA runtime is not loaded in this process")
    copy = lib.cudaMemcpyAsync
    for src, dst, nbytes in runs.tolist():
        status = copy(dst, src, nbytes, CUDA_MEMCPY_DEFAULT, stream)
        if status:
            raise RuntimeError(f"cudaMemcpyAsync of {nbytes} bytes failed: {lib.cudaGetErrorString(status).decode()}")


def copy_strided(runs: np.ndarray, stream: int) -> None:
    """Queues ``cudaMemcpy2DAsync`` on ``stream`` for each row ``(src, dst, nbytes, count, pitch)`` of ``runs``:
    ``count`` runs of ``nbytes``, each ``pitch`` bytes after the one before it on both sides (one group of layers of
    ``count`` consecutive pages, to consecutive pages), handed to a copy engine as one copy."""
    lib = _runtime()
    if lib is None:
        raise RuntimeError("the CUDA runtime is not loaded in this process")
    copy = lib.cudaMemcpy2DAsync
    for src, dst, nbytes, count, pitch in runs.tolist():
        status = copy(dst, pitch, src, pitch, nbytes, count, CUDA_MEMCPY_DEFAULT, stream)
        if status:
            raise RuntimeError(
                f"cudaMemcpy2DAsync of {count} x {nbytes} bytes failed: {lib.cudaGetErrorString(status).decode()}"
            )


def copy_strided_reference(runs: np.ndarray) -> None:
    """What ``copy_strided`` does, between host addresses."""
    for src, dst, nbytes, count, pitch in runs.tolist():
        for i in range(count):
            ctypes.memmove(dst + i * pitch, src + i * pitch, nbytes)


def copy_runs_reference(runs: np.ndarray) -> None:
    """What ``copy_runs`` does, between host addresses (off CUDA both pools are host memory)."""
    for src, dst, nbytes in runs.tolist():
        ctypes.memmove(dst, src, nbytes)
