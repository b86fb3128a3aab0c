"""Discrete tokens for CLIP image embeddings: the AR prior's vocabulary (unCLIP §2.2).

z_i is reduced to its first ``k`` principal components (the basis fit on train z_i, stored with the
cache's stats; the paper keeps 319 of 1,024 dims, ~99 % of the variance) and each component is
quantised into ``bins`` buckets, uniform over the component's range or at its quantiles; a token decodes
to the mean of the training values in its bucket. A similarity token, z_i . z_t quantised at its training
quantiles, goes first, so sampling can ask for high similarity (the paper samples from the top half).
Everything is a buffer, saved in the checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class EmbeddingTokenizer(nn.Module):
    def __init__(self, embed_dim: int, components: int = 32, bins: int = 256, sim_bins: int = 32, mode: str = "quantile"):
        super().__init__()
        if mode not in ("uniform", "quantile"):
            raise ValueError(f"tokenizer mode must be 'uniform' or 'quantile', got {mode!r}")
        if components > embed_dim:
            raise ValueError(f"cannot keep {components} principal components of a {embed_dim}-d embedding")
        self.components, self.bins, self.sim_bins, self.mode = components, bins, sim_bins, mode
        self.register_buffer("mean", torch.zeros(embed_dim))
        self.register_buffer("basis", torch.zeros(components, embed_dim))  # (k, D) rows: principal directions
        self.register_buffer("edges", torch.zeros(components, bins - 1))   # inner bucket boundaries per component
        self.register_buffer("centres", torch.zeros(components, bins))     # what each token decodes to
        self.register_buffer("sim_edges", torch.zeros(sim_bins - 1))
        self.register_buffer("explained", torch.zeros(()))                 # variance fraction the k components keep

    @torch.no_grad()
    def fit(self, z_img: torch.Tensor, z_txt: torch.Tensor, pca_mean, pca_components, explained_ratio) -> "EmbeddingTokenizer":
        """z_img, z_txt: (N, D) train embeddings; the PCA basis comes from the cache's stats."""
        self.mean.copy_(torch.as_tensor(pca_mean))
        self.basis.copy_(torch.as_tensor(pca_components)[: self.components])
        self.explained.fill_(float(torch.as_tensor(explained_ratio)[: self.components].sum()))
        coords = self.project(z_img.float())  # (N, k)
        if self.mode == "quantile":
            q = torch.linspace(0, 1, self.bins + 1, dtype=torch.float64)[1:-1]
            edges = torch.quantile(coords.double(), q, dim=0).T.float()
        else:
            lo, hi = torch.quantile(coords, 0.001, dim=0), torch.quantile(coords, 0.999, dim=0)
            edges = lo[:, None] + (hi - lo)[:, None] * torch.linspace(0, 1, self.bins + 1)[1:-1][None]
        self.edges.copy_(edges)
        tokens = self.tokens_from_coords(coords)
        for j in range(self.components):  # a bucket decodes to the mean of its training values (least squares)
            sums = torch.zeros(self.bins).index_add_(0, tokens[:, j], coords[:, j])
            counts = torch.zeros(self.bins).index_add_(0, tokens[:, j], torch.ones(len(coords)))
            fallback = torch.cat([edges[j, :1], (edges[j, 1:] + edges[j, :-1]) / 2, edges[j, -1:]])
            self.centres[j] = torch.where(counts > 0, sums / counts.clamp(min=1), fallback)
        sim = self.similarity(z_img, z_txt)
        self.sim_edges.copy_(torch.quantile(sim, torch.linspace(0, 1, self.sim_bins + 1)[1:-1]))
        return self

    def project(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean) @ self.basis.T

    def tokens_from_coords(self, coords: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.bucketize(coords[:, j].contiguous(), self.edges[j]) for j in range(self.components)], dim=1)

    def encode(self, z_img: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, k) long tokens in [0, bins)."""
        return self.tokens_from_coords(self.project(z_img.float()))

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, k) tokens -> (N, D) unit-norm embeddings."""
        coords = self.centres.gather(1, tokens.T).T  # (N, k)
        return F.normalize(coords @ self.basis + self.mean, dim=-1)

    @staticmethod
    def similarity(z_img: torch.Tensor, z_txt: torch.Tensor) -> torch.Tensor:
        return (F.normalize(z_img.float(), dim=-1) * F.normalize(z_txt.float(), dim=-1)).sum(-1)

    def encode_similarity(self, z_img: torch.Tensor, z_txt: torch.Tensor) -> torch.Tensor:
        return torch.bucketize(self.similarity(z_img, z_txt).contiguous(), self.sim_edges)

    def high_similarity(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Similarity tokens drawn uniformly from the top half of the training distribution (unCLIP §2.2)."""
        low = self.sim_bins // 2
        return torch.randint(low, self.sim_bins, (n,), generator=generator, device=self.sim_edges.device)
