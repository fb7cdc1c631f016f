"""``mosaic_core.kernels.compiles`` counts the variants of Mosaic's own Triton kernels as Triton reports each one
through its post-compile hook, and leaves a hook that was there before in the chain."""

from __future__ import annotations

import types

import pytest

from mosaic_core.kernels import compiles

knobs = pytest.importorskip("triton").knobs


@pytest.fixture
def fresh(monkeypatch):
    """Counting from nothing, with a hook of someone else's already installed; Triton's hook is put back after."""
    seen = []
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", lambda **kwargs: seen.append(kwargs["fn"].name))
    monkeypatch.setattr(compiles, "_installed", [])
    monkeypatch.setattr(compiles, "_count", [0])
    return seen


def _compiled(module: str, name: str) -> None:
    """Triton's call after it compiled ``module.name`` (the keyword arguments ``JITFunction._call_hook`` passes)."""
    fn = types.SimpleNamespace(module=module, name=name, jit_function=None)
    knobs.runtime.jit_post_compile_hook(key=None, repr=name, fn=fn, compile={}, is_manual_warmup=False,
                                        already_compiled=False)  # fmt: skip


def test_only_mosaics_own_kernels_are_counted_and_the_hook_before_still_runs(fresh):
    assert compiles.total() is None  # nothing counted before install
    assert compiles.install() and compiles.install()  # twice: one counter in the chain
    _compiled("mosaic_core.kernels.attention_kernels", "attention_partial_kernel")
    _compiled("mosaic_core.kernels.attention_kernels", "attention_merge_kernel")
    _compiled("mosaic_core.kernels.attention_kernels", "attention_merge_kernel")
    _compiled("torch._inductor.generated", "triton_poi_fused_0")
    assert compiles.total() == 3
    assert fresh == ["attention_partial_kernel", "attention_merge_kernel", "attention_merge_kernel",
                     "triton_poi_fused_0"]  # fmt: skip
