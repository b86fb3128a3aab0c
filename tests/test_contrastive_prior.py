"""The contrastive prior: its loss falls, sampling is one guided forward pass, it logs the shared prior
keys, and a published checkpoint loads back through ``unclip.load("contrastive")``."""

import lightning.pytorch as pl
import pytest
import torch

from test_prior import prior_datamodule
from unclip.loading import load
from unclip.modules.contrastive_prior import ContrastivePriorModule, cat_tokens
from unclip.modules.ema import NetEMA
from helpers import train_steps

TINY_NET = dict(embed_dim=128, text_width=None, max_text_tokens=32, dim=32, depth=2, heads=2)
OPTIM = {"optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 3e-3}, "warmup_steps": 0, "schedule": "constant"}


def tiny_module(tiny_clip, **kw):
    return ContrastivePriorModule(TINY_NET, clip=tiny_clip, val_pool=24, optim=OPTIM, **kw)


def first_batch(shapes_dir, cache_dir, split="train"):
    dm = prior_datamodule(shapes_dir, cache_dir, shuffle=False)
    dm.setup()
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()[0]
    return next(iter(loader))


def test_loss_falls_on_a_fixed_batch(shapes_dir, cache_dir, tiny_clip):
    torch.manual_seed(0)
    batch = first_batch(shapes_dir, cache_dir)
    module = tiny_module(tiny_clip)
    cond = module.condition(batch)  # token states once, as a cache with txt_tok would serve them
    batch = {**batch, "txt_tok": cond["tokens"] * cond["mask"][..., None]}
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=3e-3)
    module.eval()  # no caption dropout: the same loss before and after
    before = module.loss(batch).item()
    module.train()
    train_steps(module, batch, optimizer, 40)
    module.eval()
    assert module.loss(batch).item() < 0.6 * before
    # the learnable temperature is trained too
    assert module.logit_scale().item() != pytest.approx(1 / 0.07)
    fixed = tiny_module(tiny_clip, learn_temperature=False)
    assert all(p is not fixed.log_logit_scale for p in fixed.trainable_parameters())
    assert fixed.logit_scale().item() == pytest.approx(1 / 0.07)


def test_contrastive_term_weights_the_loss(shapes_dir, cache_dir, tiny_clip):
    batch = first_batch(shapes_dir, cache_dir)
    torch.manual_seed(0)
    plain = tiny_module(tiny_clip, contrastive_weight=0.0).eval()
    differences = []
    for weight in (0.5, 1.0):
        torch.manual_seed(0)  # the same net weights: the difference is λ times the contrastive term alone
        differences.append((tiny_module(tiny_clip, contrastive_weight=weight).eval().loss(batch) - plain.loss(batch)).item())
    assert differences[0] > 0  # InfoNCE over the batch is positive
    assert differences[1] == pytest.approx(2 * differences[0], rel=1e-4)


def test_sampling_is_one_forward_pass_and_guidance_changes_it(shapes_dir, cache_dir, tiny_clip):
    batch = first_batch(shapes_dir, cache_dir, "val")
    torch.manual_seed(0)
    module = tiny_module(tiny_clip).eval()
    cond = module.condition(batch)
    calls = []
    module.net.register_forward_hook(lambda net, args, out: calls.append(args[0].shape[0]))
    plain = module.sample(cond, torch.Generator().manual_seed(0))
    assert calls == [12] and plain.shape == (12, 128)
    assert torch.allclose(plain.norm(dim=-1), torch.ones(12))
    torch.testing.assert_close(module.sample(cond, torch.Generator().manual_seed(5)), plain)  # deterministic
    calls.clear()
    guided = module.sample(cond, guidance_scale=3.0)
    assert calls == [24]  # conditional and unconditional rows in the same single pass
    assert guided.shape == plain.shape and not torch.allclose(guided, plain, atol=1e-4)
    # guidance with scale s is uncond + s (cond - uncond), extrapolated in the normalised space
    drop = torch.ones(12, dtype=torch.bool)
    uncond = module.predict(cond["z_txt"], cond["tokens"], cond["mask"], drop)
    cond_pred = module.predict(cond["z_txt"], cond["tokens"], cond["mask"])
    expected = torch.nn.functional.normalize(module.denormalise_img(uncond + 3.0 * (cond_pred - uncond)), dim=-1)
    torch.testing.assert_close(guided, expected, atol=1e-5, rtol=1e-5)
    # a negative prompt replaces the unconditional prediction
    negative = module.condition({**batch, "caption": batch["caption"][::-1], "txt_emb": batch["txt_emb"].flip(0)})
    assert not torch.allclose(module.sample(cond, guidance_scale=3.0, negative=negative), guided, atol=1e-4)


def test_cat_tokens_pads_the_shorter_caption():
    tokens, mask = cat_tokens(torch.ones(2, 3, 4), torch.ones(2, 3, dtype=torch.bool), torch.ones(1, 5, 4),
                              torch.ones(1, 5, dtype=torch.bool))
    assert tokens.shape == (3, 5, 4) and mask.sum(1).tolist() == [3, 3, 5]
    assert cat_tokens(None, None, None, None) == (None, None)


def test_fit_logs_the_shared_keys_and_loads_back(shapes_dir, cache_dir, tiny_clip, tmp_path):
    torch.manual_seed(0)
    module = tiny_module(tiny_clip)
    ema = NetEMA(decay=0.9)
    trainer = pl.Trainer(max_steps=4, val_check_interval=4, limit_val_batches=1, callbacks=[ema], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0,
                         default_root_dir=str(tmp_path), accelerator="cpu")
    trainer.fit(module, datamodule=prior_datamodule(shapes_dir, cache_dir))
    metrics = trainer.callback_metrics
    for key in ("val/prior/cos_true", "val/prior/cos_text", "val/prior/retrieval_top1", "val/prior/retrieval_top1_unseen",
                "val/baseline_zt/cos_true", "val/baseline_linear/retrieval_top1_unseen", "train/contrastive"):
        assert key in metrics, sorted(metrics)
    torch.testing.assert_close(module.net.out.weight, ema.average.module.out.weight)  # fit ends on the EMA weights
    # published as train.py does, then loaded through the alias
    path = tmp_path / "artifacts" / "contrastive_prior" / "shapes.ckpt"
    module.publish(path)
    loaded = load("contrastive", clip=tiny_clip, artifacts=tmp_path / "artifacts")
    assert isinstance(loaded, ContrastivePriorModule) and loaded.hparams["kind"] == "contrastive_prior"
    torch.testing.assert_close(loaded.img_std, module.img_std)  # the cache's stats travel as buffers
    batch = first_batch(shapes_dir, cache_dir, "val")
    module.eval()
    torch.testing.assert_close(loaded.sample(loaded.condition(batch), guidance_scale=2.0),
                               module.sample(module.condition(batch), guidance_scale=2.0))
