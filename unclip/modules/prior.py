"""What every prior p(z_i | caption) shares: normalisation with the cache's stats, the text condition
(z_t and, optionally, the caption's token states), and one validation protocol.

Validation draws ẑ_i for a fixed pool of val pairs (``val_pool``, the same rows and seeds every time and
for every prior kind) and logs the cosine suite of :mod:`unclip.eval.prior_metrics` under ``val/prior/*`` (and
``*_unseen`` for the held-out compositions), next to the two baseline rows ``val/baseline_zt/*`` and
``val/baseline_linear/*``, logged once per run.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch

from unclip.data import cache as cache_lib
from unclip.seeding import hash_seed
from unclip.eval.prior_metrics import baseline_predictions, prior_metrics
from unclip.modules.base import UnclipModule

log = logging.getLogger(__name__)


def trim_padding(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drops the padding columns that no caption of the batch uses: masked tokens are invisible to the
    prior, so this changes nothing but the cost (shapes captions use ~12 of CLIP's 32-77 positions)."""
    used = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1
    return tokens[:, :used], mask[:, :used]


def cached_token_states(txt_tok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption token states (B, L, W) read from the embedding cache, and their mask: embed.py stores them
    zeroed past each caption's end, so a real token is one with any non-zero entry."""
    tokens = txt_tok.float()
    return tokens, tokens.abs().sum(-1) > 0


def with_text_width(net: dict, clip=None, use_token_states: bool = True) -> dict:
    """The net config with the caption-token width filled in: 0 without token states, the text tower's
    width and context length with a CLIP, else the configured width (tokens read from the cache)."""
    net = dict(net)
    if not use_token_states:
        net["text_width"] = 0
    elif clip is not None:  # the text tower decides the token width and count
        net["text_width"], net["max_text_tokens"] = clip.text_width, clip.context_length
    elif not net.get("text_width"):
        raise ValueError("use_token_states=true without a CLIP needs model.module.net.text_width (the cached token width)")
    return net


def gather_rows(module, rows: torch.Tensor) -> torch.Tensor:
    """(n_r, D) on each rank -> (sum of n_r, D) on every rank, in rank order; ranks may hold different n_r
    (all_gather needs equal shapes, so rows are padded to the largest n_r and cut after)."""
    counts = module.all_gather(torch.tensor([len(rows)], device=rows.device)).view(-1)  # (world,)
    padded = torch.cat([rows, rows.new_zeros(int(counts.max()) - len(rows), *rows.shape[1:])])
    gathered = module.all_gather(padded)  # (world, max n_r, D)
    return torch.cat([gathered[r, : int(n)] for r, n in enumerate(counts)])


class PriorModule(UnclipModule):
    """Subclasses implement ``loss(batch) -> scalar`` and ``sample(cond, generator) -> z_i (B, D)``."""

    is_prior = True  # what evaluation, the pipeline and the demo ask of a stage kind (unclip.registry.is_prior)
    keeps_stats = False  # True: the normalisation buffers are the stage's own (a published prior's), not the cache's

    def __init__(self, embed_dim: int, clip=None, use_token_states: bool = True, val_pool: int = 1000,
                 optim: dict | None = None, seed: int = 0):
        super().__init__(optim=optim, seed=seed)
        self.clip, self.use_token_states, self.val_pool = clip, use_token_states, val_pool
        # normalisation stats of the cache (filled at setup from stats.npz; saved in the checkpoint)
        for name in ("img_mean", "txt_mean"):
            self.register_buffer(name, torch.zeros(embed_dim))
        for name in ("img_std", "txt_std"):
            self.register_buffer(name, torch.ones(embed_dim))
        self.linear_baseline: tuple[torch.Tensor, torch.Tensor] | None = None
        self.pools: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        self.baselines_logged = False

    # ------------------------------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        meta = self.cache_meta()
        if meta is None:
            return
        datamodule = self.trainer.datamodule
        if meta.get("dim") != len(self.img_mean):
            raise ValueError(f"embedding dim {meta.get('dim')} in cache {datamodule.cache_dir} does not match the prior's "
                             f"embed_dim {len(self.img_mean)}; set clip= to the cache's CLIP or rebuild the cache")
        stats = cache_lib.load_stats(datamodule.cache_dir)
        if "linear_weight" not in stats:
            raise ValueError(f"stats of cache {datamodule.cache_dir} predate the linear baseline; rerun "
                             f"`python embed.py` (finished shards are kept, only the stats are recomputed)")
        for name in ("img_mean", "img_std", "txt_mean", "txt_std") if not self.keeps_stats else ():
            getattr(self, name).copy_(torch.as_tensor(stats[name]))
        self.linear_baseline = (torch.as_tensor(stats["linear_weight"]), torch.as_tensor(stats["linear_bias"]))

    def on_fit_start(self) -> None:
        if self.clip is not None:
            self.clip.to(self.device)

    on_validation_start = on_fit_start

    # ------------------------------------------------------------------------------- conditioning
    def normalise_img(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.img_mean) / self.img_std

    def denormalise_img(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.img_std + self.img_mean

    def condition(self, batch: dict) -> dict:
        """The text condition of a batch: z_t normalised with the cache's stats, and the caption's token
        states (B, L, W) with their mask, cached (``txt_tok``) or computed here by the frozen text tower."""
        z_txt = batch["txt_emb"].float()
        cond = {"z_txt": (z_txt - self.txt_mean) / self.txt_std, "z_txt_raw": z_txt, "tokens": None, "mask": None}
        if self.use_token_states:
            if "txt_tok" in batch:
                cond["tokens"], cond["mask"] = cached_token_states(batch["txt_tok"])
            elif self.clip is None:
                raise ValueError("use_token_states=true needs caption token states: cache them (embed token_states=true) "
                                 "or give the module the frozen CLIP (model.needs_clip=true)")
            else:
                with torch.no_grad():
                    text = self.clip.encode_text(batch["caption"])
                cond["tokens"], cond["mask"] = text.tokens.float().to(self.device), text.mask.to(self.device)
            cond["tokens"], cond["mask"] = trim_padding(cond["tokens"], cond["mask"])
        return cond

    # ----------------------------------------------------------------------------------- training
    def loss(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, cond: dict, generator: torch.Generator | None = None, **overrides) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        # sync_dist: the logged value is the mean over ranks, not rank 0's own batch
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["key"]), sync_dist=True)
        return loss

    # --------------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        suffix = self.split_suffix(dataloader_idx)
        size = len(batch["key"])
        # the same noise for every validation: seeded from (seed, split, batch), restored afterwards
        with torch.random.fork_rng(devices=[self.device.index or 0] if self.device.type == "cuda" else []):
            torch.manual_seed(hash_seed(self.seed, "val", dataloader_idx, batch_idx))
            self.log(f"val/loss{suffix}", self.loss(batch), batch_size=size, add_dataloader_idx=False, sync_dist=True)
        pool = self.pools[suffix]
        taken = sum(len(z) for z in pool["z_img"])
        quota = -(-self.val_pool // self.trainer.world_size)  # ranks share the pool; joined at the epoch's end
        if taken >= quota:
            return
        keep = min(size, quota - taken)
        cond = self.condition(batch)
        generator = torch.Generator(device=self.device).manual_seed(hash_seed(self.seed, "val-sample", dataloader_idx, batch_idx))
        pool["z_pred"].append(self.sample(cond, generator)[:keep].float())
        pool["z_img"].append(batch["img_emb"][:keep].float())
        pool["z_txt"].append(batch["txt_emb"][:keep].float())

    def joined_pools(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every rank's val pool joined in rank order, on every rank (each rank sampled its own share of
        the val rows), so the metrics are those of one pool whatever the number of ranks."""
        world = self.trainer.world_size
        suffixes = [self.split_suffix(i) for i in range(len(self.trainer.num_val_batches))] if world > 1 else list(self.pools)
        joined = {}
        for suffix in suffixes:  # the same order and count on every rank: each all_gather has its partner
            pool = self.pools.get(suffix, {})
            z = {k: torch.cat(pool[k]) if pool.get(k) else self.img_mean.new_zeros(0, len(self.img_mean))
                 for k in ("z_pred", "z_img", "z_txt")}
            if world > 1:
                z = {k: gather_rows(self, v)[: self.val_pool] for k, v in z.items()}
            if len(z["z_img"]):
                joined[suffix] = z
        return joined

    def on_validation_epoch_end(self) -> None:
        for suffix, z in self.joined_pools().items():
            for name, value in prior_metrics(z["z_pred"], z["z_img"], z["z_txt"]).items():
                self.log(f"val/prior/{name}{suffix}", value, add_dataloader_idx=False)
            if not self.baselines_logged and self.linear_baseline is not None:
                weight, bias = (t.to(self.device) for t in self.linear_baseline)
                for row, z_pred in baseline_predictions(z["z_txt"], weight, bias).items():
                    for name, value in prior_metrics(z_pred, z["z_img"], z["z_txt"]).items():
                        self.log(f"val/{row}/{name}{suffix}", value, add_dataloader_idx=False)
        if self.pools and self.linear_baseline is not None:
            self.baselines_logged = True
        self.pools.clear()

