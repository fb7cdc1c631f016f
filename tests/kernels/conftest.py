"""Kernel tests: every Triton kernel against its plain-torch reference.

Without a GPU the kernels run in Triton's CPU interpreter, which must be switched on before any kernel is
decorated, hence at conftest import. With a GPU the same cases run on CUDA tensors.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton", reason="triton is not installed; the kernels cannot run")

# (atol, rtol) per input dtype. Low-precision inputs round the probabilities to the KV dtype before the
# second matmul, exactly like the GPU path; accumulation is always float32.
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def _devices() -> list:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return ["cpu"]
    return [pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=_devices())
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


@pytest.fixture
def randn() -> Callable[..., torch.Tensor]:
    """Seeded standard-normal tensors: random (never zeros) yet reproducible."""
    gen = torch.Generator().manual_seed(1234)

    def make(*shape: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(dtype=dtype, device=device)

    return make


@pytest.fixture
def assert_close() -> Callable[[torch.Tensor, torch.Tensor, torch.dtype], None]:
    """Kernel output (any dtype, NaN-poisoned before the call) against a float32 reference."""

    def check(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
        assert torch.isfinite(actual).all(), "the kernel left unwritten (NaN-poisoned) or non-finite elements"
        atol, rtol = TOLERANCES[dtype]
        torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=atol, rtol=rtol)

    return check
