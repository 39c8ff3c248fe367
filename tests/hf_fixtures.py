"""Helpers of the tests that compare our networks with transformers' on tiny random models."""

from __future__ import annotations

import torch


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights far from any init (norm gains != 1, biases != 0), so a misplaced tensor shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if p.dim() == 1 and not name.endswith("bias") else 0.1 * noise)
    return model.eval()
