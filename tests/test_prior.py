"""The diffusion prior: its net, its module, EMA in validation and checkpoints, the shared prior metrics."""

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from unclip.data.datamodule import CaptionImageDataModule
from unclip.data.stats import fit_linear_map
from unclip.eval.prior_metrics import prior_metrics
from unclip.modules.diffusion_prior import DiffusionPriorModule
from unclip.modules.ema import NetEMA
from unclip.nets.prior_transformer import PriorTransformer, repeat_prefix
from helpers import fixed_loss, train_steps

TINY_NET = dict(embed_dim=128, text_width=None, max_text_tokens=32, dim=32, depth=2, heads=2)
DIFFUSION = dict(schedule="cosine", num_timesteps=100, prediction="x0")
SAMPLER = dict(kind="ddim", steps=8)


def tiny_net(**kw):
    return PriorTransformer({**dict(embed_dim=16, text_width=8, max_text_tokens=6, dim=32, depth=2, heads=4), **kw}).eval()


def test_prior_forward_shapes_and_prefix_cache_equals_full_pass():
    net = tiny_net()
    b = 5
    z, z_txt, tokens = torch.randn(b, 16), torch.randn(b, 16), torch.randn(b, 6, 8)
    t = torch.randint(0, 1000, (b,))
    mask = torch.arange(6)[None] < torch.tensor([3, 6, 1, 4, 2])[:, None]
    drop = torch.tensor([False, True, False, False, True])
    full = net(z, t, z_txt, tokens, mask, drop)
    assert full.shape == (b, 16)
    cached = net.denoise(net.encode_prefix(z_txt, tokens, mask, drop), z, t)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    rep = repeat_prefix(net.encode_prefix(z_txt, tokens, mask, drop), 3)
    torch.testing.assert_close(net.denoise(rep, z.repeat_interleave(3, 0), t.repeat_interleave(3, 0)),
                               full.repeat_interleave(3, 0), atol=1e-5, rtol=1e-5)


def test_prior_attends_causally_and_dropping_hides_the_caption():
    net = tiny_net()
    z, z_txt, tokens, t = torch.randn(2, 16), torch.randn(2, 16), torch.randn(2, 6, 8), torch.tensor([3, 700])
    mask = torch.ones(2, 6, dtype=torch.bool)
    other_tokens, other_txt = torch.randn(2, 6, 8), torch.randn(2, 16)
    drop = torch.ones(2, dtype=torch.bool)
    # a dropped caption: neither its tokens nor z_t reach the output
    torch.testing.assert_close(net(z, t, z_txt, tokens, mask, drop), net(z, t, other_txt, other_tokens, mask, drop))
    # tokens beyond a caption's end (mask False) are invisible too
    short = torch.arange(6)[None].expand(2, -1) < 3
    changed = tokens.clone()
    changed[:, 3:] = 9.0
    torch.testing.assert_close(net(z, t, z_txt, tokens, short), net(z, t, z_txt, changed, short))
    # so padding columns can be trimmed away without changing the output (positions after the text are fixed)
    from unclip.modules.prior import trim_padding
    trimmed_tokens, trimmed_mask = trim_padding(tokens, short)
    assert trimmed_tokens.shape[1] == 3
    torch.testing.assert_close(net(z, t, z_txt, trimmed_tokens, trimmed_mask), net(z, t, z_txt, tokens, short))
    # and the caption does matter when kept
    assert not torch.allclose(net(z, t, z_txt, tokens, mask), net(z, t, other_txt, other_tokens, mask))
    with pytest.raises(ValueError, match="max_text_tokens"):
        net(z, t, z_txt, torch.randn(2, 7, 8), torch.ones(2, 7, dtype=torch.bool))


def test_prior_metrics_and_linear_baseline():
    g = torch.Generator().manual_seed(0)
    z_img, z_txt = torch.randn(50, 8, generator=g), torch.randn(50, 8, generator=g)
    perfect = prior_metrics(z_img, z_img, z_txt)
    assert perfect["cos_true"] == pytest.approx(1.0) and perfect["retrieval_top1"] == 1.0
    assert perfect["cos_text"] == pytest.approx(perfect["baseline_cos"]) and perfect["cos_text_minus_baseline"] == pytest.approx(0, abs=1e-6)
    ignores_caption = prior_metrics(z_txt.roll(1, 0), z_img, z_txt)
    assert ignores_caption["cos_unrelated"] == pytest.approx(1.0) and ignores_caption["retrieval_top1"] < 0.2
    # fd_img compares distributions, not pairs: the true set shuffled scores 0 (and a low cos_true), while
    # a point estimate pulled towards the mean keeps a high cos_true but a collapsed spread
    centre = torch.full((8,), 2.0)
    cluster = centre + z_img
    shuffled = prior_metrics(cluster.roll(7, 0), cluster, z_txt)
    shrunk = prior_metrics(centre + 0.3 * z_img, cluster, z_txt)
    assert perfect["fd_img"] == pytest.approx(0, abs=1e-4) and shuffled["fd_img"] == pytest.approx(0, abs=1e-4)
    assert shrunk["cos_true"] > shuffled["cos_true"] and shrunk["fd_img"] > 10 * max(shuffled["fd_img"], 1e-3)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 6)).astype(np.float32)
    w_true, b_true = rng.standard_normal((6, 6)), rng.standard_normal(6)
    weight, bias = fit_linear_map(x, x @ w_true + b_true, ridge=1e-8)
    np.testing.assert_allclose(weight, w_true, atol=1e-3)
    np.testing.assert_allclose(bias, b_true, atol=1e-3)


def prior_datamodule(shapes_dir, cache_dir, **kw):
    return CaptionImageDataModule(train=str(shapes_dir / "train-*.tar"), val=str(shapes_dir / "val-*.tar"),
                                  val_unseen=str(shapes_dir / "val_unseen-*.tar"), fields=["img_emb", "txt_emb", "caption"],
                                  cache_dir=cache_dir, batch_size=16, val_batch_size=12, embed_dim=128, **kw)


def tiny_module(tiny_clip, **kw):
    return DiffusionPriorModule(TINY_NET, DIFFUSION, SAMPLER, clip=tiny_clip, val_pool=24,
                                optim={"optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 3e-3},
                                       "warmup_steps": 0, "schedule": "constant"}, **kw)


@pytest.mark.parametrize("prediction", ["x0", "eps"])
def test_prior_loss_falls_on_a_fixed_batch(shapes_dir, cache_dir, tiny_clip, prediction):
    torch.manual_seed(0)
    dm = prior_datamodule(shapes_dir, cache_dir, shuffle=False)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    module = DiffusionPriorModule(TINY_NET, {**DIFFUSION, "prediction": prediction}, SAMPLER, clip=tiny_clip)
    optimizer = torch.optim.AdamW(module.net.parameters(), lr=3e-3)

    before = fixed_loss(module, batch)
    train_steps(module, batch, optimizer, 40 if prediction == "x0" else 100)
    # eps is the slower target for the prior (the paper predicts x0): a fall, not a collapse
    assert fixed_loss(module, batch) < (0.6 if prediction == "x0" else 0.96) * before


def test_sampling_is_seeded_best_of_n_and_unit_norm(shapes_dir, cache_dir, tiny_clip):
    dm = prior_datamodule(shapes_dir, cache_dir, shuffle=False)
    dm.setup()
    batch = next(iter(dm.val_dataloader()[0]))
    module = tiny_module(tiny_clip).eval()
    cond = module.condition(batch)
    a = module.sample(cond, torch.Generator().manual_seed(0))
    b = module.sample(cond, torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)
    assert a.shape == (12, 128) and torch.allclose(a.norm(dim=-1), torch.ones(12))
    # best-of-4 keeps, per caption, the most z_t-like of the same 4 draws a best-of-1 run would see one by one
    z_txt = torch.nn.functional.normalize(batch["txt_emb"].float(), dim=-1)
    best = (module.sample(cond, torch.Generator().manual_seed(3), best_of=4) * z_txt).sum(-1)
    single = (module.sample(cond, torch.Generator().manual_seed(3), best_of=1) * z_txt).sum(-1)
    assert best.mean() >= single.mean()
    guided = module.sample(cond, torch.Generator().manual_seed(0), guidance_scale=3.0)
    assert guided.shape == a.shape and not torch.allclose(guided, a)


@pytest.mark.parametrize("kind", ["dpmpp_2m", "unipc"])
def test_fast_solvers_sample_the_prior_through_the_sampler_config(shapes_dir, cache_dir, tiny_clip, kind):
    dm = prior_datamodule(shapes_dir, cache_dir, shuffle=False)
    dm.setup()
    module = DiffusionPriorModule(TINY_NET, DIFFUSION, {**SAMPLER, "kind": kind}, clip=tiny_clip).eval()
    cond = module.condition(next(iter(dm.val_dataloader()[0])))
    z = module.sample(cond, torch.Generator().manual_seed(0), guidance_scale=3.0)
    assert module.sampler.kind == kind and z.shape == (12, 128) and torch.allclose(z.norm(dim=-1), torch.ones(12))
    torch.testing.assert_close(z, module.sample(cond, torch.Generator().manual_seed(0), guidance_scale=3.0))


class RecordValidationWeights(pl.Callback):
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.seen = pl_module.net.out.weight.detach().clone()


def test_validation_and_checkpoints_use_ema_weights(shapes_dir, cache_dir, tiny_clip, tmp_path):
    torch.manual_seed(0)
    module = tiny_module(tiny_clip)
    ema, record = NetEMA(decay=0.9), RecordValidationWeights()
    trainer = pl.Trainer(max_steps=6, val_check_interval=6, limit_val_batches=1, callbacks=[ema, record], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0,
                         default_root_dir=str(tmp_path), accelerator="cpu")
    trainer.fit(module, datamodule=prior_datamodule(shapes_dir, cache_dir))
    averaged = ema.average.module.out.weight.detach()
    torch.testing.assert_close(record.seen, averaged)  # validation ran on the EMA weights
    torch.testing.assert_close(module.net.out.weight, averaged)  # and so does the module after fit
    metrics = trainer.callback_metrics
    for key in ("val/prior/cos_true", "val/prior/retrieval_top1_unseen", "val/prior/fd_img", "val/baseline_linear/cos_true",
                "val/baseline_zt/retrieval_top1", "val/baseline_linear/fd_img_unseen"):
        assert key in metrics, sorted(metrics)
    path = tmp_path / "prior.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    torch.testing.assert_close(state["state_dict"]["net.out.weight"], averaged)
    assert "current_model_state" in state and state["hyper_parameters"]["kind"] == "diffusion_prior"
    assert state["hyper_parameters"]["net"]["text_width"] == tiny_clip.text_width
    assert "clip" in state["hyper_parameters"] and "img_mean" in state["state_dict"]
    assert not any(k.startswith("clip") for k in state["state_dict"])  # the frozen CLIP is named, not stored
    # resuming the finished run (as publishing it later does) trains nothing and still ends on the EMA weights
    state["current_model_state"] = {k: v + 1 if k.startswith("net.") and v.is_floating_point() else v
                                    for k, v in state["current_model_state"].items()}  # raw weights != EMA
    torch.save(state, path)
    resumed = tiny_module(tiny_clip)
    trainer = pl.Trainer(max_steps=6, callbacks=[NetEMA(decay=0.9)], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path), accelerator="cpu")
    trainer.fit(resumed, datamodule=prior_datamodule(shapes_dir, cache_dir), ckpt_path=path, weights_only=True)
    torch.testing.assert_close(resumed.net.out.weight, averaged)


def test_ema_warmup_follows_early_and_settles_at_decay():
    from unclip.modules.ema import warmup_ema

    update = warmup_ema(decay=0.99, warmup=10)
    averaged, current = [torch.zeros(3)], [torch.ones(3)]
    update(averaged, current, torch.tensor(0))  # first update: decay (1 + 0) / 10 = 0.1
    torch.testing.assert_close(averaged[0], torch.full((3,), 0.9))
    averaged = [torch.zeros(3)]
    update(averaged, current, torch.tensor(10_000))  # late: the configured decay
    torch.testing.assert_close(averaged[0], torch.full((3,), 0.01))


def test_ema_resumes_when_the_strategy_took_the_state_dict_and_refuses_sharded_fsdp(tmp_path):
    # FSDP loads a full checkpoint's state_dict into its wrapped model and pops it before callbacks see it:
    # the EMA then reads its weights from the checkpoint file
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy, SingleDeviceStrategy

    module = torch.nn.Module()
    module.net = torch.nn.Linear(3, 2)
    ema, raw = {f"net.{k}": torch.full_like(v, 1.0) for k, v in module.net.state_dict().items()}, \
        {f"net.{k}": torch.full_like(v, 2.0) for k, v in module.net.state_dict().items()}
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": ema, "current_model_state": raw}, path)
    trainer = SimpleNamespace(strategy=SingleDeviceStrategy.__new__(SingleDeviceStrategy), world_size=1, ckpt_path=str(path))
    callback = NetEMA(decay=0.9)
    callback.setup(trainer, module, "fit")
    callback.on_load_checkpoint(trainer, module, {"current_model_state": raw})  # no state_dict left
    assert all((p == 1.0).all() for p in callback.average.module.parameters())
    assert all((p == 2.0).all() for p in module.net.parameters())
    sharded = SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy), world_size=2)
    with pytest.raises(ValueError, match="cannot follow FSDP over 2 devices: train with strategy=ddp"):
        NetEMA().setup(sharded, module, "fit")


def test_a_block_computing_only_its_last_positions_matches_the_full_block():
    from unclip.nets.layers import Block, causal_mask

    torch.manual_seed(0)
    block = Block(32, 4).eval()
    x = torch.randn(3, 7, 32)
    mask = causal_mask(torch.arange(7)[None] < torch.tensor([7, 4, 5])[:, None], 7)
    full, (k_full, _) = block(x, mask)
    last, (k_last, _) = block(x, mask, last=2)
    assert last.shape == (3, 2, 32)
    torch.testing.assert_close(last, full[:, -2:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_last, k_full)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_attention_on_cpu_equals_the_fused_kernel_in_values_and_gradients(dtype, monkeypatch):
    import torch.nn.functional as F

    from unclip.nets.layers import attention, causal_mask

    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 7, 8, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = causal_mask(torch.tensor([[True] * 7, [True] * 4 + [False] * 3, [False] * 2 + [True] * 5]), 7)
    fused = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    fused_grads = torch.autograd.grad(fused.float().square().sum(), (q, k, v))
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    plain = attention(q, k, v, mask)
    plain_grads = torch.autograd.grad(plain.float().square().sum(), (q, k, v))
    assert not calls  # training on a CPU, small scores: the two-matmul path
    calls.clear()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(plain.float(), fused.float(), atol=tol)
    assert all(torch.allclose(a.float(), b.float(), atol=tol * 4) for a, b in zip(plain_grads, fused_grads))
    with torch.no_grad():
        attention(q, k, v, mask)
    assert calls  # sampling keeps the fused kernel
    calls.clear()
    monkeypatch.setattr("unclip.nets.layers.PLAIN_ATTENTION_MAX_SCORES", 3 * 2 * 7 * 7 - 1)
    attention(q, k, v, mask)
    assert calls  # past the size where the fused kernel wins, training takes it too
