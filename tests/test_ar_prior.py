"""The AR prior: PCA + quantised tokens, the token layout, KV-cached sampling, its loss, its metrics."""

import numpy as np
import pytest
import torch

from test_prior import prior_datamodule
from unclip.data import cache as cache_lib
from unclip.embedding_tokens import EmbeddingTokenizer
from unclip.modules.ar_prior import ARPriorModule
from unclip.nets.ar_transformer import ARTransformer, filter_logits
from helpers import train_steps

TOKENIZER = dict(components=16, bins=64, sim_bins=8, mode="quantile")


def fitted_tokenizer(z_img, z_txt, **kw):
    centred = (z_img - z_img.mean(0)).double()
    _, s, v = torch.linalg.svd(centred, full_matrices=False)
    ratio = s ** 2 / (s ** 2).sum()
    return EmbeddingTokenizer(z_img.shape[1], **{**TOKENIZER, **kw}).fit(z_img, z_txt, z_img.mean(0), v.float(), ratio)


@pytest.mark.parametrize("mode", ["quantile", "uniform"])
def test_pca_quantise_round_trip(mode):
    g = torch.Generator().manual_seed(0)
    low_rank = torch.randn(2000, 8, generator=g) @ torch.randn(8, 32, generator=g)  # 8 dims carry everything
    z_img = torch.nn.functional.normalize(low_rank + 0.01 * torch.randn(2000, 32, generator=g), dim=-1)
    z_txt = torch.nn.functional.normalize(z_img + 0.3 * torch.randn(2000, 32, generator=g), dim=-1)
    tok = fitted_tokenizer(z_img, z_txt, components=8, mode=mode)
    assert float(tok.explained) > 0.99
    tokens = tok.encode(z_img)
    assert tokens.shape == (2000, 8) and tokens.min() >= 0 and tokens.max() < 64
    cos = (tok.decode(tokens) * z_img).sum(-1)
    assert cos.mean() > 0.99  # 8 components x 64 bins reconstruct a rank-8 embedding closely
    coarse = fitted_tokenizer(z_img, z_txt, components=8, bins=4, mode=mode)
    assert (coarse.decode(coarse.encode(z_img)) * z_img).sum(-1).mean() < cos.mean()  # fewer bins, larger error
    sim = tok.encode_similarity(z_img, z_txt)
    counts = torch.bincount(sim, minlength=8)
    assert counts.min() > 150  # quantile bins: each similarity token about equally frequent
    assert tok.high_similarity(100, torch.Generator().manual_seed(0)).min() >= 4  # top half only


def tiny_ar(**kw):
    return ARTransformer({**dict(embed_dim=16, text_width=8, max_text_tokens=6, components=5, bins=11, sim_bins=4,
                                 dim=32, depth=2, heads=4), **kw}).eval()


def test_token_layout_is_causal_over_z_tokens():
    net = tiny_ar()
    z_txt, tokens, mask = torch.randn(3, 16), torch.randn(3, 6, 8), torch.ones(3, 6, dtype=torch.bool)
    sim, z_tokens = torch.tensor([0, 1, 3]), torch.randint(0, 11, (3, 5))
    logits = net(z_txt, tokens, mask, None, sim, z_tokens)
    assert logits.shape == (3, 5, 11)
    changed = z_tokens.clone()
    changed[:, 3] = (changed[:, 3] + 1) % 11
    after = net(z_txt, tokens, mask, None, sim, changed)
    torch.testing.assert_close(after[:, :4], logits[:, :4])  # c_4 predicts from c_1..c_3 only (and c_4 itself onward)
    assert not torch.allclose(after[:, 4], logits[:, 4])
    assert not torch.allclose(net(z_txt, tokens, mask, None, torch.tensor([3, 3, 3]), z_tokens)[:, 0], logits[:, 0])


def test_kv_cache_sampling_equals_uncached_sampling():
    net = tiny_ar()
    z_txt, tokens = torch.randn(4, 16), torch.randn(4, 6, 8)
    mask = torch.arange(6)[None] < torch.tensor([2, 6, 4, 3])[:, None]
    sim, drop = torch.tensor([0, 1, 2, 3]), torch.tensor([False, True, False, False])

    def sampler(seed):
        g = torch.Generator().manual_seed(seed)
        return lambda logits: torch.multinomial(filter_logits(logits, top_k=5).softmax(-1), 1, generator=g).squeeze(1)

    cached = net.generate(z_txt, tokens, mask, drop, sim, sampler(7))
    uncached = net.generate(z_txt, tokens, mask, drop, sim, sampler(7), use_cache=False)
    assert cached.shape == (4, 5)
    torch.testing.assert_close(cached, uncached)


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.85)).tolist() == [[False, False, False, True]]


def ar_module(tiny_clip, **kw):
    return ARPriorModule({"embed_dim": 128, "dim": 32, "depth": 2, "heads": 2, "max_text_tokens": 32}, TOKENIZER,
                         clip=tiny_clip, val_pool=24, **kw)


def fit_on_cache(module, cache_dir):
    names = sorted(n for n, s in cache_lib.read_meta(cache_dir)["splits"].items() if s == "train")
    tables = [cache_lib.read_cache_shard(f"{cache_dir}/{n}", ("img_emb", "txt_emb")) for n in names]
    z_img = torch.from_numpy(np.concatenate([t["img_emb"] for t in tables])).float()
    z_txt = torch.from_numpy(np.concatenate([t["txt_emb"] for t in tables])).float()
    stats = cache_lib.load_stats(cache_dir)
    module.tokenizer.fit(z_img, z_txt, stats["pca_mean"], stats["pca_components"], stats["pca_explained_ratio"])
    return z_img


def test_ar_prior_loss_falls_and_samples(shapes_dir, cache_dir, tiny_clip):
    torch.manual_seed(0)
    module = ar_module(tiny_clip)
    z_img = fit_on_cache(module, cache_dir)
    assert 0 < module.roundtrip_cos(z_img) <= 1
    dm = prior_datamodule(shapes_dir, cache_dir, shuffle=False)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    optimizer = torch.optim.AdamW(module.net.parameters(), lr=3e-3)
    module.eval()
    before = module.loss(batch).item()
    module.train()
    train_steps(module, batch, optimizer, 40)
    module.eval()
    assert module.loss(batch).item() < 0.6 * before
    cond = module.condition(batch)
    a = module.sample(cond, torch.Generator().manual_seed(0), guidance_scale=2.0, top_p=0.9)
    b = module.sample(cond, torch.Generator().manual_seed(0), guidance_scale=2.0, top_p=0.9)
    assert a.shape == (16, 128) and torch.allclose(a.norm(dim=-1), torch.ones(16))
    torch.testing.assert_close(a, b)
