"""Records the final hidden state of every forward pass the engine turns into a token.

The tiny preset's random weights answer almost every question with one token repeated, so equal tokens say
little; equal hidden states before the LM head, step by step, say that two paths computed the same thing.
"""

from __future__ import annotations

import torch


def record_hiddens(model, monkeypatch) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    logits = model.logits

    def recording(hidden):
        seen.append(hidden.detach().float().cpu().clone())
        return logits(hidden)

    monkeypatch.setattr(model, "logits", recording)
    return seen


def assert_same_hiddens(actual: list[torch.Tensor], expected: list[torch.Tensor], atol: float = 1e-4) -> None:
    assert len(actual) == len(expected), (len(actual), len(expected))
    for step, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert torch.allclose(a, e, atol=atol, rtol=1e-4), f"step {step}: max diff {(a - e).abs().max().item():.3g}"


def rows_of(hiddens: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each question's hidden state on its own: a batched decode step records one row per question."""
    return [row for hidden in hiddens for row in hidden.split(1)]
