"""cluster_scores against cluster_scores_reference, and the estimator against the true attention mass."""

from __future__ import annotations

import math

import pytest
import torch

from mosaic_core.errors import InvalidArgumentError
from mosaic_core.kernels import cluster_scores, cluster_scores_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (num_q_heads, num_kv_heads, num_q_tokens, head_dim, num_clusters)
CASES = [
    (4, 2, 17, 64, 17),  # GQA group of 2, rows (34) straddle two query blocks
    (3, 1, 5, 128, 97),  # group of 3 (not a power of two), clusters straddle four cluster blocks
    (2, 2, 1, 64, 1),  # one cluster, one token, no grouping
]


def _summaries(randn, num_clusters, num_kv_heads, head_dim, dtype, device):
    # Centroids come from a [kv_heads, clusters, dim] store and variances from a wider buffer, so both are
    # non-contiguous views, as the engine's summary tables may be.
    centroids = randn(num_kv_heads, num_clusters, head_dim, dtype=dtype, device=device).transpose(0, 1)
    wide = randn(num_clusters, num_kv_heads, head_dim + 3, dtype=torch.float32, device=device)
    variances = (wide[..., :head_dim] ** 2 * 0.5).to(dtype)
    log_counts = torch.log(torch.randint(1, 400, (num_clusters,)).float()).to(device)
    return centroids, variances, log_counts


@pytest.mark.parametrize("use_spread", [True, False], ids=["spread", "mean_key"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "q{}kv{}t{}d{}c{}".format(*c))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(case, dtype, use_spread, device, randn, assert_close):
    num_q_heads, num_kv_heads, num_q_tokens, head_dim, num_clusters = case
    # A slice of a longer token axis: the query is not contiguous.
    query = randn(num_q_heads, num_q_tokens + 2, head_dim, dtype=dtype, device=device)[:, 1:-1]
    centroids, variances, log_counts = _summaries(randn, num_clusters, num_kv_heads, head_dim, dtype, device)
    scale = head_dim**-0.5
    out = torch.full((num_clusters, num_kv_heads), math.nan, device=device)

    result = cluster_scores(query, centroids, variances, log_counts, scale=scale, out=out, use_spread=use_spread)

    assert result is out
    expected = cluster_scores_reference(query, centroids, variances, log_counts, scale=scale, use_spread=use_spread)
    assert_close(out, expected, dtype)


def test_mean_key_scores_are_the_plain_dot_product_with_the_centroid(device, randn, assert_close):
    """Mean-key scoring ignores the variance and the count: an independent einsum, not the reference, checks it."""
    query = randn(4, 9, 64, device=device)
    centroids, variances, log_counts = _summaries(randn, 21, 2, 64, torch.float32, device)
    dots = torch.einsum("gtd,cgd->cgt", query.float().reshape(2, 18, 64), centroids.float()) * 0.125

    out = cluster_scores(query, centroids, variances * 100, log_counts + 50, scale=0.125, use_spread=False)

    assert_close(out, dots.amax(dim=2), torch.float32)


def test_small_blocks_cover_every_cluster_and_row(device, randn, assert_close):
    query = randn(6, 7, 64, device=device)
    centroids, variances, log_counts = _summaries(randn, 33, 2, 64, torch.float32, device)

    out = cluster_scores(query, centroids, variances, log_counts, scale=0.125, block_c=16, block_q=16)

    assert_close(out, cluster_scores_reference(query, centroids, variances, log_counts, scale=0.125), torch.float32)


def test_estimate_tracks_true_log_mass_of_gaussian_clusters():
    """The Gaussian moment-generating estimate is close to log sum_j exp(scale * q.k_j) for Gaussian keys."""
    gen = torch.Generator().manual_seed(7)
    head_dim, num_keys, scale = 64, 20000, 64**-0.5
    mu = torch.randn(2, 1, head_dim, generator=gen) * 0.5  # [clusters, kv_heads, dim]
    var = torch.rand(2, 1, head_dim, generator=gen) * 0.5
    query = torch.randn(1, 1, head_dim, generator=gen)
    keys = mu + var.sqrt() * torch.randn(2, num_keys, head_dim, generator=gen)  # [clusters, keys, dim]
    true_mass = torch.logsumexp(scale * keys @ query[0, 0], dim=1)  # [clusters]

    est = cluster_scores_reference(query, mu, var, torch.full((2,), math.log(num_keys)), scale=scale)

    torch.testing.assert_close(est[:, 0], true_mass, atol=0.05, rtol=0.0)


def test_spread_and_size_raise_the_score_by_their_formula(device, randn):
    query = randn(2, 3, 64, device=device)
    mu = randn(1, 1, 64, device=device).expand(3, 1, 64).contiguous()
    var = torch.stack([torch.zeros(1, 64), torch.full((1, 64), 0.5), torch.zeros(1, 64)]).to(device)
    log_counts = torch.tensor([0.0, 0.0, math.log(100.0)], device=device)

    out = cluster_scores(query, mu, var, log_counts, scale=0.125).cpu()

    assert out[1, 0] > out[0, 0]
    torch.testing.assert_close(out[2, 0] - out[0, 0], torch.tensor(math.log(100.0)), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("query_shape", "centroid_shape", "variance_shape", "num_counts", "match"),
    [
        ((4, 3, 64), (5, 3, 64), (5, 3, 64), 5, "not a multiple"),
        ((4, 3, 64), (5, 2, 32), (5, 2, 32), 5, "head_dim differs"),
        ((4, 3, 64), (5, 2, 64), (5, 2, 63), 5, "must match centroids"),
        ((4, 3, 64), (5, 2, 64), (5, 2, 64), 4, "num_clusters=5"),
        ((4, 64), (5, 2, 64), (5, 2, 64), 5, r"\(4, 64\)"),
    ],
)
def test_rejects_mismatched_shapes(query_shape, centroid_shape, variance_shape, num_counts, match, device):
    def rand(*shape):
        return torch.rand(shape, device=device) + 0.1

    with pytest.raises(InvalidArgumentError, match=match):
        cluster_scores(rand(*query_shape), rand(*centroid_shape), rand(*variance_shape), rand(num_counts), scale=0.125)


def test_rejects_integer_query(device):
    with pytest.raises(InvalidArgumentError, match="int32"):
        cluster_scores(
            torch.ones(2, 1, 16, dtype=torch.int32, device=device),
            torch.rand(3, 1, 16, device=device),
            torch.rand(3, 1, 16, device=device),
            torch.rand(3, device=device),
            scale=0.25,
        )


@pytest.mark.parametrize("case", CASES, ids=lambda c: "q{}kv{}t{}d{}c{}".format(*c))
def test_the_engines_torch_scores_equal_the_kernel_it_uses_on_cuda(case, device, randn, assert_close):
    """The engine's scorers use the kernel on CUDA and its torch twin elsewhere (``scorers.KeyScorer``), on one
    layer of the summary table, a strided view: they must agree."""
    num_q_heads, num_kv_heads, num_q_tokens, head_dim, num_clusters = case
    query = randn(num_q_heads, num_q_tokens, head_dim, device=device)
    # the engine passes one layer of its [C, layers, heads, dim] summary table: a strided view
    table = randn(num_clusters, 3, num_kv_heads, head_dim, device=device)
    centroids, variances = table[:, 1], table[:, 2].square()
    log_counts = torch.log(torch.randint(1, 400, (num_clusters,)).float()).to(device)
    kernel = cluster_scores(query, centroids, variances, log_counts, scale=head_dim**-0.5)
    torch_twin = cluster_scores_reference(query, centroids, variances, log_counts, scale=head_dim**-0.5)
    assert_close(kernel, torch_twin, torch.float32)
