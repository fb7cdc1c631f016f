"""The language model's small-pass Triton kernels (norm, add and norm, SiLU gate, rotary) against transformers'
arithmetic, and the fused modules that run them on small passes.

Without CUDA the kernels run in Triton's CPU interpreter, in float32 and float16 (the interpreter truncates to
bfloat16 instead of rounding, see ``test_vision_rotary.py``); the CUDA tests check bfloat16 on the 7B's widths.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

from mosaic_core.errors import InvalidArgumentError
from mosaic_core.model import text_fusion
from mosaic_core.model.text_fusion import _add_rms_norm, _silu_mul, fuse_text_elementwise, use_small_pass_kernels
from mosaic_core.model.vision_tower import _rms_norm
from tests.engine.language_model_helpers import tiny_language_model

pytest.importorskip("triton", reason="triton is not installed; the kernels cannot run")

from mosaic_core.kernels import text_elementwise
from mosaic_core.kernels.text_elementwise import rms_norm, silu_mul, text_rotary

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
# The interpreter re-wraps triton.language's helpers for the whole process (kernels.prepare_interpreter), which
# would break compiled kernels later in the run; with a GPU the CUDA tests below cover the kernels instead.
interpreted = pytest.mark.skipif(HAS_CUDA, reason="CUDA present: the CUDA tests cover the kernels")
DTYPES = [torch.float32, torch.float16]


def _rows(rows: int, width: int, dtype, device="cpu", seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(seed)).to(dtype=dtype, device=device)


def _rotated_by_transformers(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``apply_rotary_pos_emb`` on ``x`` ``[rows, heads, head_dim]``, in the layout transformers calls it with."""
    as_batch = x.transpose(0, 1).unsqueeze(0)  # [1, heads, rows, head_dim]
    rotated, _ = apply_rotary_pos_emb(as_batch, as_batch, cos.unsqueeze(0), sin.unsqueeze(0))
    return rotated.squeeze(0).transpose(0, 1)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("rows", "width"), [(7, 200), (1, 64), (3, 33)])
def test_interpreted_rms_norm_matches_transformers(rows, width, dtype, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = _rows(rows, width, dtype)
    weight = _rows(1, width, dtype, seed=1)[0]

    total, out = rms_norm(x, weight, 1e-6)

    assert total is None and out.dtype == dtype
    torch.testing.assert_close(out, _rms_norm(x, weight, 1e-6), rtol=1e-6, atol=1e-6)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_interpreted_add_rms_norm_matches_the_layers_add_and_norm(dtype, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    residual, update = _rows(5, 96, dtype), _rows(5, 96, dtype, seed=2)
    weight = _rows(1, 96, dtype, seed=3)[0]

    total, out = rms_norm(residual, weight, 1e-6, update=update)

    expected_total, expected = _add_rms_norm(residual, update, weight, 1e-6)
    assert torch.equal(total, expected_total)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    # Normalising the residual alone (an add left out) is far off: the comparison above can fail.
    assert (rms_norm(residual, weight, 1e-6)[1] - expected).abs().max() > 0.1


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_interpreted_silu_mul_matches_transformers(dtype, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    gate, up = _rows(4, 1500, dtype), _rows(4, 1500, dtype, seed=1)  # two column blocks, the second partial

    out = silu_mul(gate, up)

    # ``tl.exp`` is not PyTorch's ``expf``: in float16 an element may round one ulp the other way.
    rtol, atol = (1e-6, 1e-6) if dtype == torch.float32 else (2**-10, 2**-14)
    torch.testing.assert_close(out, _silu_mul(gate, up), rtol=rtol, atol=atol)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("rows", "heads", "head_dim"), [(6, 4, 16), (3, 2, 128), (5, 3, 10)])
def test_interpreted_rotary_is_bit_equal_to_transformers(rows, heads, head_dim, dtype, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = _rows(rows, heads * head_dim, dtype).view(rows, heads, head_dim)
    # Random cos and sin, not a real rotary's (whose halves are equal): a kernel that mixed up halves would fail.
    cos, sin = _rows(rows, head_dim, dtype, seed=1), _rows(rows, head_dim, dtype, seed=2)

    out = text_rotary(x, cos, sin)

    assert torch.equal(out, _rotated_by_transformers(x, cos, sin))
    assert (out - _rotated_by_transformers(x, cos, -sin)).abs().max() > 0.5


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: rms_norm(torch.zeros(2, 8), torch.zeros(7), 1e-6), "weight must be"),
        (lambda: rms_norm(torch.zeros(2, 8), torch.zeros(8), 1e-6, update=torch.zeros(3, 8)), "update must be"),
        (lambda: silu_mul(torch.zeros(2, 8), torch.zeros(2, 9)), "up must be"),
        (lambda: silu_mul(torch.zeros(2, 8, 1), torch.zeros(2, 8, 1)), r"\[rows, width\]"),
        (lambda: text_rotary(torch.zeros(2, 3, 7), torch.zeros(2, 7), torch.zeros(2, 7)), "even"),
        (lambda: text_rotary(torch.zeros(2, 3, 8), torch.zeros(3, 8), torch.zeros(2, 8)), "cos must be"),
    ],
)
def test_misuse_raises_with_the_shapes(call, message, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(InvalidArgumentError, match=message):
        call()


def _last_hidden(language_model, embeds: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return language_model(inputs_embeds=embeds, use_cache=False).last_hidden_state


@interpreted
def test_small_passes_run_the_kernels_and_give_transformers_hidden_states(monkeypatch):
    """A small pass of the tiny language model, fused with the small-pass kernels on (interpreted): each layer runs
    its norm, add and norm, SiLU gate and rotaries as kernels, and the hidden states are transformers'; turned off,
    no kernel runs and they are transformers' bit for bit. The kernels take CUDA tensors only, so this test lets
    CPU tensors take them (the interpreter runs them)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(text_fusion, "_takes_small_kernels", lambda module, hidden: module.small_kernels)
    language_model = tiny_language_model()
    embeds = torch.randn(1, 5, language_model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    expected = _last_hidden(language_model, embeds)
    num_layers = len(language_model.layers)
    fuse_text_elementwise(language_model, compile=False)
    launches = {"rms_norm": 0, "silu_mul": 0, "text_rotary": 0}

    def counted(name):
        kernel = getattr(text_elementwise, name)

        def run(*args, **kwargs):
            launches[name] += 1
            return kernel(*args, **kwargs)

        return run

    for name in launches:
        monkeypatch.setattr(text_elementwise, name, counted(name))

    fused = _last_hidden(language_model, embeds)

    # Per layer: the input norm, the add and norm after attention; then the final norm. Rotary: query and key.
    assert launches == {"rms_norm": 2 * num_layers + 1, "silu_mul": num_layers, "text_rotary": 2 * num_layers}
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)

    assert use_small_pass_kernels(language_model, False) == 5 * num_layers + 1  # two norms, MLP, attention, layer
    launches.update(dict.fromkeys(launches, 0))
    assert torch.equal(_last_hidden(language_model, embeds), expected)
    assert launches == {"rms_norm": 0, "silu_mul": 0, "text_rotary": 0}


@pytest.mark.parametrize("interpreter", ["0", "1"])
def test_cpu_tensors_stay_eager(interpreter, monkeypatch):
    """A CPU pass never takes the kernels, even under the interpreter (which other tests of the run switch on for
    the whole process): CPU installs run as before, bit for bit."""
    monkeypatch.setenv("TRITON_INTERPRET", interpreter)
    language_model = tiny_language_model()
    embeds = torch.randn(1, 5, language_model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    expected = _last_hidden(language_model, embeds)
    fuse_text_elementwise(language_model, compile=False)
    for name in ("rms_norm", "silu_mul", "text_rotary"):
        monkeypatch.setattr(text_elementwise, name, _forbidden)
    assert torch.equal(_last_hidden(language_model, embeds), expected)


def _forbidden(*args, **kwargs):
    raise AssertionError("a small-pass kernel ran on CPU tensors")


# --- CUDA (the lead's H200 runs these) ------------------------------------------------------------------------


def _bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in bfloat16 ulps, through the bit patterns mapped to ordered integers (-0 and +0 both 0)."""

    def ordered(t):
        bits = t.view(torch.int16).int()
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (ordered(a) - ordered(b)).abs()


def _assert_nearly_bit_equal(out: torch.Tensor, expected: torch.Tensor) -> None:
    """At most one bfloat16 ulp apart, on at most 1% of the elements: what float32 sums in another order, or
    another ``exp``/``rsqrt``, can change after rounding."""
    ulps = _bf16_ulps(out, expected)
    assert ulps.max() <= 1, f"{int(ulps.max())} ulps apart"
    assert (ulps > 0).float().mean() <= 0.01, f"{float((ulps > 0).float().mean()):.4%} of elements differ"


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 32, 1023])
def test_cuda_norms_match_transformers_in_bfloat16(rows):
    x, update = _rows(rows, 3584, torch.bfloat16, "cuda"), _rows(rows, 3584, torch.bfloat16, "cuda", seed=1)
    weight = _rows(1, 3584, torch.bfloat16, "cuda", seed=2)[0]

    _, normed = rms_norm(x, weight, 1e-6)
    total, added = rms_norm(x, weight, 1e-6, update=update)

    _assert_nearly_bit_equal(normed, _rms_norm(x, weight, 1e-6))
    expected_total, expected = _add_rms_norm(x, update, weight, 1e-6)
    assert torch.equal(total, expected_total)
    _assert_nearly_bit_equal(added, expected)


@needs_cuda
@pytest.mark.gpu
def test_cuda_silu_mul_and_rotary_match_transformers_in_bfloat16():
    gate, up = _rows(32, 18944, torch.bfloat16, "cuda"), _rows(32, 18944, torch.bfloat16, "cuda", seed=1)
    _assert_nearly_bit_equal(silu_mul(gate, up), _silu_mul(gate, up))
    for heads in (28, 4):  # the 7B's query and key heads
        x = _rows(32, heads * 128, torch.bfloat16, "cuda", seed=heads).view(32, heads, 128)
        cos, sin = _rows(32, 128, torch.bfloat16, "cuda", seed=3), _rows(32, 128, torch.bfloat16, "cuda", seed=4)
        assert torch.equal(text_rotary(x, cos, sin), _rotated_by_transformers(x, cos, sin))
