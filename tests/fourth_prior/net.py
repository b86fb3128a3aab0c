"""The net of the linear prior: one affine map from the normalised z_t to the normalised z_i."""

import torch
import torch.nn as nn


class LinearPriorNet(nn.Module):
    def __init__(self, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, z_txt: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, D)
        return self.proj(z_txt)
