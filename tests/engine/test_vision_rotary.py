"""The Triton vision rotary against ``vision_attention._rotate`` (transformers' ``apply_rotary_pos_emb_vision``
arithmetic), on the strided ``qkv[:2]`` view the attention passes, and the attention's choice of rotary.

Without CUDA the kernel runs in Triton's CPU interpreter. There it is bit-equal to ``_rotate`` in float32 and
float16. In bfloat16 the interpreter (Triton 3.9) truncates float32 to bfloat16 instead of rounding to nearest
even (``create_fp_trunc`` calls ``_convert_float`` with no rounding mode), so its output is checked bit for bit
against ``_rotate``'s float32 result either rounded (what a GPU does) or truncated (what the interpreter does).
On CUDA the kernel is built without FMA contraction and casts with round-to-nearest-even, so it should be
bit-equal to ``_rotate`` too; not yet run on a GPU, so the CUDA tests allow what a contracted multiply-add could
change: one bfloat16 ulp on at most 1% of the elements, 2**-20 in float32.
"""

from __future__ import annotations

import pytest
import torch

from mosaic_core.errors import InvalidArgumentError
from mosaic_core.model.vision_attention import BatchedChunkAttention, _rotate

pytest.importorskip("triton", reason="triton is not installed; the kernel cannot run")

import mosaic_core.kernels.vision_rotary as rotary_module
from mosaic_core.kernels.vision_rotary import vision_rotary

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
# The interpreter re-wraps triton.language's helpers for the whole process (kernels.prepare_interpreter), which
# would break compiled kernels later in the run; with a GPU the CUDA tests below cover the kernel instead.
interpreted = pytest.mark.skipif(HAS_CUDA, reason="CUDA present: the CUDA tests cover the kernel")

# (seq, heads, head_dim, block_rows): sequences that are not multiples of the rows per program.
CASES = [
    (17, 4, 16, 4),  # the tiny preset's heads; 5 programs, the last with one row
    (97, 16, 80, None),  # the 7B's heads and head_dim (halves of 40 in 64-wide blocks), default 2 rows
    (131, 3, 10, 8),  # heads not a power of two, halves of 5 in 8-wide blocks
    (1, 16, 80, None),
]


def _qkv_view(seq, heads, head_dim, dtype, device, gen):
    """``qkv[:2]`` exactly as ``BatchedChunkAttention`` slices it: a strided view of the projection's output."""
    qkv = torch.randn(seq, 3 * heads * head_dim, generator=gen).to(dtype=dtype, device=device)
    return qkv.reshape(seq, 3, heads, head_dim).permute(1, 0, 2, 3)[:2]  # [2, seq, heads, head_dim]


def _angles(seq, head_dim, device, gen):
    """Random cos and sin, not a real rotary's (whose halves are equal): every element of both must be used where
    it belongs, so a kernel that mixed up the halves of cos or sin would fail."""
    cos = torch.randn(seq, head_dim, generator=gen).to(device)
    sin = torch.randn(seq, head_dim, generator=gen).to(device)
    return cos, sin


def _truncated_bf16(values: torch.Tensor) -> torch.Tensor:
    return (values.float().view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)


def _bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in bfloat16 ulps, through the bit patterns mapped to ordered integers (-0 and +0 both 0)."""

    def ordered(t):
        bits = t.view(torch.int16).int()
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (ordered(a) - ordered(b)).abs()


@interpreted
@pytest.mark.parametrize("case", CASES, ids=lambda c: "s{}h{}d{}b{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_interpreted_kernel_is_bit_equal_to_rotate(case, dtype, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    seq, heads, head_dim, block_rows = case
    gen = torch.Generator().manual_seed(seq)
    query_key = _qkv_view(seq, heads, head_dim, dtype, "cpu", gen)
    cos, sin = _angles(seq, head_dim, "cpu", gen)

    out = vision_rotary(query_key, cos, sin, block_rows=block_rows)

    assert out.shape == query_key.shape and out.dtype == dtype and out.is_contiguous()
    if dtype == torch.bfloat16:
        exact = _rotate(query_key.float(), cos, sin)  # float32: the arithmetic before the final cast
        assert torch.equal(out, exact.to(dtype)) or torch.equal(out, _truncated_bf16(exact))
    else:
        assert torch.equal(out, _rotate(query_key, cos, sin))


@interpreted
def test_a_wrong_sign_or_swapped_halves_would_fail(monkeypatch):
    """The comparison above can fail: ``_rotate`` with sin negated (which is also rotate_half's halves swapped,
    ``cat(x_hi, -x_lo)``) or with cos's halves exchanged is far from the kernel's output."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    gen = torch.Generator().manual_seed(3)
    query_key = _qkv_view(33, 4, 16, torch.float32, "cpu", gen)
    cos, sin = _angles(33, 16, "cpu", gen)

    out = vision_rotary(query_key, cos, sin, block_rows=8)

    assert torch.equal(out, _rotate(query_key, cos, sin))
    assert (out - _rotate(query_key, cos, -sin)).abs().max() > 1.0
    assert (out - _rotate(query_key, cos.roll(8, dims=1), sin)).abs().max() > 1.0


@interpreted
def test_empty_sequence_launches_nothing(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    query_key = torch.empty(3, 0, 4, 16)[:2]
    out = vision_rotary(query_key, torch.empty(0, 16), torch.empty(0, 16))
    assert out.shape == (2, 0, 4, 16)


@pytest.mark.parametrize(
    ("query_key_shape", "angles_shape", "message"),
    [
        ((3, 5, 4, 16), (5, 16), "stack query and key"),
        ((2, 5, 4, 15), (5, 15), "even"),
        ((2, 5, 4, 16), (6, 16), "cos must be"),
        ((2, 5, 16), (5, 16), "4-D"),
    ],
)
def test_misuse_raises_with_the_shapes(query_key_shape, angles_shape, message, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(InvalidArgumentError, match=message):
        vision_rotary(torch.zeros(query_key_shape), torch.zeros(angles_shape), torch.zeros(angles_shape))


def test_cpu_tensors_take_the_attentions_rotate_even_where_kernels_are_ready(monkeypatch):
    """The kernel is for CUDA tensors only: on the CPU the attention keeps ``rotate`` (eager or compiled)."""
    from mosaic_core.model.qwen2_5_vl import Qwen25VLAdapter

    monkeypatch.setattr("mosaic_core.model.vision_attention.kernels_ready", lambda: True)
    monkeypatch.setattr(rotary_module, "vision_rotary", _forbidden)
    rotated = []

    def counted_rotate(query_key, cos, sin):
        rotated.append(tuple(query_key.shape))
        return _rotate(query_key, cos, sin)

    monkeypatch.setattr(BatchedChunkAttention, "rotate", staticmethod(counted_rotate))
    attention = _first_attention(Qwen25VLAdapter.from_preset("tiny", device="cpu"))
    seq = 64
    hidden = torch.randn(seq, attention.qkv.in_features, generator=torch.Generator().manual_seed(0))
    head_dim = attention.qkv.out_features // 3 // attention.num_heads
    cos, sin = _angles(seq, head_dim, "cpu", torch.Generator().manual_seed(1))
    with torch.no_grad():
        attention(hidden, torch.tensor([0, 32, 64]), position_embeddings=(cos, sin))
    assert rotated == [(2, seq, attention.num_heads, head_dim)]


def _forbidden(*args, **kwargs):
    raise AssertionError("the Triton rotary ran on CPU tensors")


def _first_attention(model) -> BatchedChunkAttention:
    return next(m for m in model.model.model.visual.modules() if isinstance(m, BatchedChunkAttention))


# --- CUDA (the lead's H200 runs these) ------------------------------------------------------------------------


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("seq", [2 * 512 + 37, 43 * 512], ids=["odd", "43_frames"])
def test_cuda_kernel_matches_rotate_in_bfloat16(seq):
    gen = torch.Generator().manual_seed(seq)
    query_key = _qkv_view(seq, 16, 80, torch.bfloat16, "cuda", gen)  # the 7B tower's heads and head_dim
    cos, sin = _angles(seq, 80, "cuda", gen)

    out = vision_rotary(query_key, cos, sin)

    expected = _rotate(query_key, cos, sin)
    ulps = _bf16_ulps(out, expected)
    assert ulps.max() <= 1, f"{int(ulps.max())} ulps apart"
    assert (ulps > 0).float().mean() <= 0.01, f"{float((ulps > 0).float().mean()):.4%} of elements differ"


@needs_cuda
@pytest.mark.gpu
def test_cuda_kernel_matches_rotate_in_float32():
    gen = torch.Generator().manual_seed(5)
    query_key = _qkv_view(1031, 16, 80, torch.float32, "cuda", gen)
    cos, sin = _angles(1031, 80, "cuda", gen)

    out = vision_rotary(query_key, cos, sin, block_rows=4)

    torch.testing.assert_close(out, _rotate(query_key, cos, sin), rtol=0, atol=2**-20)


@needs_cuda
@pytest.mark.gpu
def test_cuda_attention_runs_the_kernel_and_computes_what_rotate_gives(monkeypatch):
    """A bfloat16 tiny tower on CUDA: the batched attention calls the kernel once per forward, and its output is
    the one it gives with ``_rotate`` (kernel switched off), within bfloat16 tolerance: room for what a one-ulp
    rotary difference can become after attention and the output projection."""
    from mosaic_core.model.qwen2_5_vl import Qwen25VLAdapter

    model = Qwen25VLAdapter.from_preset("tiny", device="cuda", dtype=torch.bfloat16)
    attention = _first_attention(model)
    monkeypatch.setattr(attention, "rotate", _rotate)  # eager, not the compiled one the adapter set on CUDA
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return vision_rotary(*args, **kwargs)

    seq = 4 * 64 + 16  # four chunks of 64 and one of 16: the gathered path too
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(seq, attention.qkv.in_features, generator=gen).to("cuda", torch.bfloat16)
    head_dim = attention.qkv.out_features // 3 // attention.num_heads
    cos, sin = _angles(seq, head_dim, "cuda", gen)
    cu_seqlens = torch.tensor([0, 64, 128, 192, 208, 272], device="cuda")
    with torch.no_grad():
        monkeypatch.setattr(rotary_module, "vision_rotary", counted)
        with_kernel = attention(hidden, cu_seqlens, position_embeddings=(cos, sin))
        monkeypatch.setattr("mosaic_core.model.vision_attention.kernels_ready", lambda: False)
        with_rotate = attention(hidden, cu_seqlens, position_embeddings=(cos, sin))
    assert calls == [(2, seq, attention.num_heads, head_dim)]
    torch.testing.assert_close(with_kernel, with_rotate, rtol=1.6e-2, atol=1e-2)
