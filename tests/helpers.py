"""Small models with known behaviour, shared by several test modules."""

from __future__ import annotations

import torch
from torch import nn


class Linear2(nn.Module):
    """Two logits (0, w.x + b): class 1 iff w.x + b > 0."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(score), score], dim=1)
