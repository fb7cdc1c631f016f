"""decode / paged decode / prefill attention against the float32 torch references."""

from __future__ import annotations

import math

import pytest
import torch

import mosaic_core.kernels.attention as attention_module
import mosaic_core.kernels.attention_plan as attention_plan
from mosaic_core.errors import InvalidArgumentError
from mosaic_core.kernels import (
    decode_attention,
    decode_attention_reference,
    paged_decode_attention,
    paged_decode_attention_reference,
    paged_slot_attention,
    paged_slot_attention_reference,
    paged_slot_logsumexp,
    paged_slot_logsumexp_reference,
    prefill_attention,
    prefill_attention_reference,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def poison_split_workspace(monkeypatch):
    """NaN in the split workspace: a partial that stage 1 fails to write reaches the output as NaN."""
    monkeypatch.setattr(attention_module, "_POISON_WORKSPACE", True)


def _nan_like(shape, dtype, device):
    return torch.full(shape, math.nan, dtype=dtype, device=device)


def _kv_pair(randn, batch, num_kv_heads, tokens, head_dim, dtype, device, layout):
    """k, v as [batch, kv_heads, tokens, head_dim] views: contiguous, or token-major storage transposed."""
    if layout == "contiguous":
        return [randn(batch, num_kv_heads, tokens, head_dim, dtype=dtype, device=device) for _ in range(2)]
    # One [batch, tokens, 2, kv_heads, head_dim] buffer, as an interleaved KV cache would hold it.
    kv = randn(batch, tokens, 2, num_kv_heads, head_dim, dtype=dtype, device=device)
    return kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)


# (batch, num_q_heads, num_kv_heads, max_kv, head_dim, kv_lens or None, num_splits or None)
DECODE_CASES = [
    (3, 4, 2, 97, 64, [97, 17, 1], 3),  # uneven lengths, the short ones leave whole splits empty
    (2, 6, 2, 17, 128, None, None),  # group of 3, default split plan
    (2, 2, 2, 97, 64, [0, 50], 2),  # an empty sequence gets zeros
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "b{}q{}kv{}n{}d{}-lens{}-s{}".format(*c))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_matches_reference(case, dtype, device, randn, assert_close):
    batch, num_q_heads, num_kv_heads, max_kv, head_dim, lens, num_splits = case
    layout = "contiguous" if head_dim == 128 else "interleaved"
    q = randn(batch, num_q_heads + 1, head_dim, dtype=dtype, device=device)[:, 1:]  # a head slice
    k, v = _kv_pair(randn, batch, num_kv_heads, max_kv, head_dim, dtype, device, layout)
    kv_lens = None if lens is None else torch.tensor(lens, dtype=torch.int32, device=device)
    out = _nan_like(q.shape, dtype, device)

    result = decode_attention(q, k, v, kv_lens, scale=head_dim**-0.5, out=out, num_splits=num_splits)

    assert result is out
    assert_close(out, decode_attention_reference(q, k, v, kv_lens, scale=head_dim**-0.5), dtype)


def _page_layout(batch_lens, page_tokens, gen):
    """A shuffled pool of pages plus a -1 padded table that maps each sequence onto distinct pages."""
    pages_needed = [-(-n // page_tokens) for n in batch_lens]
    max_pages = max(pages_needed) + 1  # always some -1 padding at the end
    num_pages = sum(pages_needed) + 3  # pages no sequence uses
    order = torch.randperm(num_pages, generator=gen)
    table = torch.full((len(batch_lens), max_pages), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages_needed):
        table[b, :n] = order[used : used + n].to(torch.int32)
        used += n
    return num_pages, table


@pytest.mark.parametrize(
    ("page_tokens", "dtype"),
    [(1, torch.float32), (8, torch.float32), (16, torch.float32), (8, torch.bfloat16), (16, torch.float16)],
    ids=lambda x: str(x),
)
def test_paged_decode_matches_reference(page_tokens, dtype, device, randn, assert_close):
    num_q_heads, num_kv_heads, head_dim, lens = 4, 2, 64, [97, 17]
    num_pages, page_table = _page_layout(lens, page_tokens, torch.Generator().manual_seed(3))
    # One pool of [num_pages, 2, kv_heads, page_tokens, head_dim]: k and v are strided views into it.
    pool = randn(num_pages, 2, num_kv_heads, page_tokens, head_dim, dtype=dtype, device=device)
    k_pages, v_pages = pool[:, 0], pool[:, 1]
    q = randn(2, num_q_heads, head_dim, dtype=dtype, device=device)
    kv_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    page_table = page_table.to(device)
    out = _nan_like(q.shape, dtype, device)

    paged_decode_attention(q, k_pages, v_pages, page_table, kv_lens, scale=0.125, out=out, num_splits=2)

    expected = paged_decode_attention_reference(q, k_pages, v_pages, page_table, kv_lens, scale=0.125)
    assert_close(out, expected, dtype)


def test_paged_decode_equals_contiguous_decode_of_gathered_pages(device, randn, assert_close):
    """Reading pages in place must give what attention over a gathered contiguous copy gives."""
    page_tokens, lens = 16, [40]
    num_pages, page_table = _page_layout(lens, page_tokens, torch.Generator().manual_seed(5))
    k_pages = randn(num_pages, 2, page_tokens, 64, device=device)
    v_pages = randn(num_pages, 2, page_tokens, 64, device=device)
    q = randn(1, 4, 64, device=device)
    kv_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    pages = page_table[0, :3].long().to(device)
    k = k_pages[pages].transpose(0, 1).flatten(1, 2)[None]  # [1, kv_heads, 48, 64]
    v = v_pages[pages].transpose(0, 1).flatten(1, 2)[None]

    paged = paged_decode_attention(q, k_pages, v_pages, page_table.to(device), kv_lens, scale=0.125)
    contiguous = decode_attention(q, k, v, kv_lens, scale=0.125)

    assert_close(paged, contiguous, torch.float32)


# (num_q_heads, num_kv_heads, q_len, kv_len, head_dim, causal_offset or None, num_splits or None)
PREFILL_CASES = [
    (4, 2, 17, 97, 64, None, 2),  # 80 past keys + causal among 17 new, split in two
    (2, 1, 17, 17, 128, None, 1),  # no past: plain causal
    (4, 4, 5, 97, 64, 3, 3),  # explicit offset: later keys are invisible to every query
    (6, 2, 1, 17, 64, None, None),  # one token: same as decode
]


@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: "q{}kv{}m{}n{}d{}-off{}-s{}".format(*c))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_matches_reference(case, dtype, device, randn, assert_close):
    num_q_heads, num_kv_heads, q_len, kv_len, head_dim, offset, num_splits = case
    q = randn(q_len, num_q_heads, head_dim, dtype=dtype, device=device).transpose(0, 1)  # token-major store
    k, v = (t[0] for t in _kv_pair(randn, 1, num_kv_heads, kv_len, head_dim, dtype, device, "interleaved"))
    out = _nan_like(q.shape, dtype, device)

    prefill_attention(q, k, v, scale=head_dim**-0.5, causal_offset=offset, out=out, num_splits=num_splits)

    expected = prefill_attention_reference(q, k, v, scale=head_dim**-0.5, causal_offset=offset)
    assert_close(out, expected, dtype)


def test_prefill_small_blocks_cross_tiles_and_splits(device, randn, assert_close):
    """16-key blocks and 97 rows: causal limits fall inside blocks, tiles and splits of every kind."""
    q = randn(2, 97, 64, device=device)
    k, v = randn(1, 97, 64, device=device), randn(1, 97, 64, device=device)

    out = prefill_attention(q, k, v, scale=0.125, block_n=16, num_splits=3)

    assert_close(out, prefill_attention_reference(q, k, v, scale=0.125), torch.float32)


def test_prefill_last_token_equals_decode(device, randn, assert_close):
    q = randn(4, 9, 64, device=device)
    k, v = randn(2, 33, 64, device=device), randn(2, 33, 64, device=device)

    prefill = prefill_attention(q, k, v, scale=0.125)
    decode = decode_attention(q[None, :, -1], k[None], v[None], scale=0.125)

    assert_close(prefill[:, -1], decode[0], torch.float32)


def test_attention_rejects_misuse(device):
    def rand(*shape, dtype=torch.float32):
        return (torch.rand(shape, device=device) + 0.1).to(dtype)

    with pytest.raises(InvalidArgumentError, match="not a multiple"):
        decode_attention(rand(2, 5, 64), rand(2, 2, 17, 64), rand(2, 2, 17, 64), scale=0.1)
    with pytest.raises(InvalidArgumentError, match="share a dtype"):
        decode_attention(rand(2, 4, 64), rand(2, 2, 17, 64, dtype=torch.float16), rand(2, 2, 17, 64), scale=0.1)
    with pytest.raises(InvalidArgumentError, match=r"kv_lens \[3, 18\]"):
        lens = torch.tensor([3, 18], dtype=torch.int32, device=device)
        decode_attention(rand(2, 4, 64), rand(2, 2, 17, 64), rand(2, 2, 17, 64), lens, scale=0.1)
    with pytest.raises(InvalidArgumentError, match=r"batch differs: q \(3, 4, 64\)"):
        decode_attention(rand(3, 4, 64), rand(2, 2, 17, 64), rand(2, 2, 17, 64), scale=0.1)
    with pytest.raises(InvalidArgumentError, match="causal_offset=-1"):
        prefill_attention(rand(4, 9, 64), rand(2, 8, 64), rand(2, 8, 64), scale=0.1)
    pages, lens = rand(4, 2, 8, 64), torch.tensor([9], dtype=torch.int32, device=device)
    with pytest.raises(InvalidArgumentError, match=r"page ids in use span \[-1, 2\]"):
        table = torch.tensor([[2, -1, 0]], dtype=torch.int32, device=device)
        paged_decode_attention(rand(1, 4, 64), pages, pages, table, lens, scale=0.1)
    with pytest.raises(InvalidArgumentError, match=r"\[0, 8\]"):
        table = torch.tensor([[2]], dtype=torch.int32, device=device)
        paged_decode_attention(rand(1, 4, 64), pages, pages, table, lens, scale=0.1)


# (batch, num_q_heads, num_kv_heads, page_tokens, head_dim, q_len, kv_lens, num_splits)
SLOT_CASES = [
    (1, 4, 2, 16, 64, 17, [97], 2),  # a question of 17 tokens over partly filled pages, split in two
    (3, 4, 2, 8, 32, 5, [40, 5, 23], None),  # ingest rows of unequal pasts; the second row has no past
    (2, 2, 1, 1, 16, 1, [9, 1], 3),  # decode over one-token pages
]


@pytest.mark.parametrize("case", SLOT_CASES, ids=lambda c: "b{}q{}kv{}p{}d{}t{}-lens{}-s{}".format(*c))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paged_slot_attention_matches_reference(case, dtype, device, randn, assert_close):
    batch, num_q_heads, num_kv_heads, page_tokens, head_dim, q_len, lens, num_splits = case
    num_pages = 32
    # The pool as the arena holds it: [pages, layers, 2, kv_heads, page_tokens, head_dim]; attend to layer 1.
    pool = randn(num_pages, 3, 2, num_kv_heads, page_tokens, head_dim, dtype=dtype, device=device)
    k_pages, v_pages = pool[:, 1, 0], pool[:, 1, 1]
    gen = torch.Generator().manual_seed(7)
    # Slots scattered over the pool, never in page order, padded with -1 past each sequence's length.
    table = torch.full((batch, max(lens) + 3), -1, dtype=torch.int32)
    for b, n in enumerate(lens):
        table[b, :n] = torch.randperm(num_pages * page_tokens, generator=gen)[:n].to(torch.int32)
    table, kv_lens = table.to(device), torch.tensor(lens, dtype=torch.int32, device=device)
    q = randn(batch, num_q_heads, q_len, head_dim, dtype=dtype, device=device)
    out = _nan_like(q.shape, dtype, device)
    got = paged_slot_attention(q, k_pages, v_pages, table, kv_lens, scale=0.3, out=out, num_splits=num_splits)
    expected = paged_slot_attention_reference(q, k_pages, v_pages, table, kv_lens, scale=0.3)
    for b, n in enumerate(lens):
        if n < q_len:  # queries with fewer keys than new tokens: only the last n see anything
            continue
        assert_close(got[b], expected[b], dtype)


# (num_q_heads, num_kv_heads, page_tokens, head_dim, q_len, num_keys)
LSE_CASES = [
    (4, 2, 16, 64, 17, 300),  # a question over a past of several key blocks
    (28, 4, 126, 128, 3, 130),  # the 7B's heads, one-frame pages
    (2, 1, 8, 32, 1, 5),  # fewer keys than a key block
]


@pytest.mark.parametrize("case", LSE_CASES, ids=lambda c: "q{}kv{}p{}d{}t{}-keys{}".format(*c))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paged_slot_logsumexp_matches_reference(case, dtype, device, randn):
    """Every row sees every key (no causal mask), whatever its token, and the splits combine to one log-sum-exp."""
    num_q_heads, num_kv_heads, page_tokens, head_dim, q_len, num_keys = case
    num_pages = -(-num_keys // page_tokens) + 3
    pool = randn(num_pages, 2, 2, num_kv_heads, page_tokens, head_dim, dtype=dtype, device=device)
    k_pages, v_pages = pool[:, 1, 0], pool[:, 1, 1]
    gen = torch.Generator().manual_seed(11)
    slots = torch.randperm(num_pages * page_tokens, generator=gen)[:num_keys].to(torch.int32)
    table = slots.reshape(1, -1).to(device)
    q = randn(num_q_heads, q_len, head_dim, dtype=dtype, device=device) * 4  # large logits: no overflow
    got = paged_slot_logsumexp(q, k_pages, v_pages, table, scale=0.3)
    expected = paged_slot_logsumexp_reference(q, k_pages, table, scale=0.3)
    assert got.shape == (num_q_heads, q_len) and got.dtype == torch.float32
    atol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got.cpu(), expected.float().cpu(), atol=atol, rtol=1e-4)
    # the first key alone, and none: one row's logit, then minus infinity
    one = paged_slot_logsumexp(q, k_pages, v_pages, table[:, :1], scale=0.3)
    torch.testing.assert_close(one.cpu(), paged_slot_logsumexp_reference(q, k_pages, table[:, :1], scale=0.3).cpu(),
                               atol=atol, rtol=1e-4)  # fmt: skip
    assert torch.isneginf(paged_slot_logsumexp(q, k_pages, v_pages, table[:, :0], scale=0.3)).all()
    with pytest.raises(InvalidArgumentError, match="batch=1 rows"):
        paged_slot_logsumexp(q, k_pages, v_pages, table.expand(2, -1), scale=0.3)


def _slot_launch(batch, q_len, keys):
    return attention_plan.AttentionLaunch(
        batch=batch, num_q_heads=28, num_kv_heads=4, q_len=q_len, head_dim=128, max_kv_tokens=keys,
        causal_shift=0, page_tokens=126, slots=True,
    )  # fmt: skip


# (batch, q_len, block_m, splits of the resident plan, splits of the plan before it) on a 132-SM GPU
H200_SPLITS = [
    (1, 1, 16, 64, 64),  # one answer: capped at 64 splits, 256 programs either way
    (8, 1, 16, 16, 9),  # 8 answers: 512 programs, where the old plan's 288 came out 24 past 264
    (16, 1, 16, 8, 5),
    (1, 32, 64, 16, 16),  # a 32-token question: 256 programs either way
    (1, 64, 64, 9, 10),  # a 64-token question: 252 programs, where 280 passed 264
]


@pytest.mark.parametrize("case", H200_SPLITS, ids=lambda c: "b{}q{}".format(*c))
def test_the_resident_split_plan_fills_the_sms_once(case, monkeypatch):
    batch, q_len, block_m, resident, before = case
    monkeypatch.setattr(attention_plan, "num_sms", lambda device: 132)
    launch = _slot_launch(batch, q_len, 16384)
    device = torch.device("cpu")
    assert attention_plan.plan_splits(launch, block_m, 64, None, device)[0] == resident
    monkeypatch.setattr(attention_plan, "_split_plan", "twice_the_sms")
    assert attention_plan.plan_splits(launch, block_m, 64, None, device)[0] == before


def test_an_unknown_split_plan_is_refused():
    with pytest.raises(InvalidArgumentError, match="not one of"):
        attention_plan.use_split_plan("thrice")
