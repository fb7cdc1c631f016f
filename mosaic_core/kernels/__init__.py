"""Triton kernels of the engine, each with a plain-torch reference twin in :mod:`.reference`.

Kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests them). The kernel
modules are imported lazily, on first attribute access, so importing this package never needs triton.
``TRITON_INTERPRET`` is read at each launch (see :func:`launchable`), so it may be set at any time before the
first kernel runs, even after triton or a kernel module was imported.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from typing import TYPE_CHECKING, Any

import torch

from mosaic_core.errors import InvalidArgumentError
from mosaic_core.kernels.reference import (
    cluster_scores_reference,
    copy_spans_reference,
    decode_attention_reference,
    gather_rows_reference,
    paged_decode_attention_reference,
    paged_slot_attention_reference,
    paged_slot_logsumexp_reference,
    prefill_attention_reference,
)

if TYPE_CHECKING:
    from mosaic_core.kernels.attention import (
        decode_attention,
        paged_decode_attention,
        paged_slot_attention,
        paged_slot_logsumexp,
        prefill_attention,
    )
    from mosaic_core.kernels.gather import gather_rows, gather_spans
    from mosaic_core.kernels.scoring import cluster_scores

__all__ = [
    "cluster_scores",
    "cluster_scores_reference",
    "copy_spans_reference",
    "decode_attention",
    "decode_attention_reference",
    "gather_rows",
    "gather_rows_reference",
    "gather_spans",
    "interpret_mode",
    "launchable",
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "paged_slot_attention",
    "paged_slot_attention_reference",
    "paged_slot_logsumexp",
    "paged_slot_logsumexp_reference",
    "prefill_attention",
    "prefill_attention_reference",
    "triton_available",
]

_LAZY_KERNELS = {
    "cluster_scores": "mosaic_core.kernels.scoring",
    "gather_rows": "mosaic_core.kernels.gather",
    "gather_spans": "mosaic_core.kernels.gather",
    "decode_attention": "mosaic_core.kernels.attention",
    "paged_decode_attention": "mosaic_core.kernels.attention",
    "paged_slot_attention": "mosaic_core.kernels.attention",
    "paged_slot_logsumexp": "mosaic_core.kernels.attention",
    "prefill_attention": "mosaic_core.kernels.attention",
}

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INTERPRETED: dict[Any, Any] = {}


def interpret_mode() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    """Whether the Triton kernels can run here.

    Returns:
        False when triton is not installed, or when there is no CUDA device and ``TRITON_INTERPRET`` is not
        ``"1"``; True otherwise.
    """
    if importlib.util.find_spec("triton") is None:
        return False
    return interpret_mode() or torch.cuda.is_available()


@functools.cache
def kernels_ready() -> bool:
    """``triton_available()``, asked once per process: callers ask on every layer of every decode step."""
    return triton_available()


def prepare_interpreter() -> None:
    """Makes triton.language's own ``@jit`` helpers (``tl.sum``, ``tl.max``, ``tl.zeros``...) interpretable.

    ``@triton.jit`` decides when it decorates whether to build an interpreted function. If triton was
    imported before ``TRITON_INTERPRET=1`` was set (transformers imports it, for one), those helpers stay
    compile-only and an interpreted kernel fails at its first ``tl.sum``. Re-wrapping them is idempotent and
    happens only in interpreter mode.
    """
    if not interpret_mode():
        return
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    for module in (tl, tl.standard, tl.math, tl.random):
        for name, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                setattr(module, name, InterpretedFunction(value.fn))


def launchable(kernel: Any) -> Any:
    """The kernel in the form that can launch now.

    In interpreter mode a kernel decorated before ``TRITON_INTERPRET=1`` was set is a compile-only
    ``JITFunction``; it is wrapped for the interpreter (once), so the mode can be chosen at any time before
    the first launch. Elsewhere the kernel is returned as it is.
    """
    if not interpret_mode():
        return kernel
    prepare_interpreter()
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return _INTERPRETED.setdefault(kernel, InterpretedFunction(kernel.fn))
    return kernel


def __getattr__(name: str) -> Any:
    module_name = _LAZY_KERNELS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module_name), name)


def cdiv(a: int, b: int) -> int:
    """Ceiling division; ``triton.cdiv`` costs microseconds per call on the launch path."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


# --- argument checks shared by the kernel wrappers (misuse raises InvalidArgumentError) ---------------------


def check_rank(name: str, tensor: torch.Tensor, rank: int, layout: str) -> None:
    if tensor.dim() != rank:
        raise InvalidArgumentError(f"{name} must be {layout} ({rank}-D), got shape {tuple(tensor.shape)}")


def check_float_dtype(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        raise InvalidArgumentError(f"{name} must be float16, bfloat16 or float32, got {tensor.dtype}")


def check_index_dtype(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in (torch.int32, torch.int64):
        raise InvalidArgumentError(f"{name} must be int32 or int64, got {tensor.dtype}")


def check_kernel_device(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    """Checks that a kernel operand lives where the kernel runs."""
    if tensor.device != device:
        raise InvalidArgumentError(f"{name} is on {tensor.device}, but the kernel runs on {device}")
    if device.type != "cuda" and not interpret_mode():
        raise InvalidArgumentError(f"{name} is on {device}: Triton kernels need CUDA tensors unless TRITON_INTERPRET=1")


def check_out(out: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device:
        raise InvalidArgumentError(
            f"out must be {shape} {dtype} on {device}, got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
