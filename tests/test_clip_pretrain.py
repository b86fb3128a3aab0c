import torch
import torch.nn.functional as F

from unclip.data.datamodule import CaptionImageDataModule
from unclip.modules.clip_pretrain import ClipPretrainModule, retrieval_topk, zero_shot_attributes


def test_retrieval_topk_on_known_similarities():
    z = torch.eye(4)
    assert retrieval_topk(z, z) == {1: 1.0, 5: 1.0}
    shuffled = z[[1, 0, 2, 3]]  # captions 0 and 1 point at each other's images
    assert retrieval_topk(shuffled, z, ks=(1,))[1] == 0.5


def test_zero_shot_uses_the_nearest_class_prompt():
    def encode(texts):  # a fake text tower: one axis per shape word, colour ignored
        from unclip.data.shapes import VOCAB
        out = torch.zeros(len(texts), 16)
        for i, t in enumerate(texts):
            for j, s in enumerate(VOCAB.shapes):
                out[i, j] += float(t.endswith(s))
            for j, c in enumerate(VOCAB.colors):
                out[i, 6 + j] += float(f" {c} " in f" {t} ")
        return out

    metas = [{"objects": [{"shape": "star", "color": "red"}]}, {"objects": [{"shape": "circle", "color": "blue"}]}]
    z_img = F.normalize(torch.stack([torch.eye(16)[3] + torch.eye(16)[6], torch.eye(16)[0] + torch.eye(16)[11]]), dim=-1)
    assert zero_shot_attributes(encode, z_img, metas) == {"shape": 1.0, "color": 1.0}


def test_contrastive_loss_falls_on_a_fixed_batch(shapes_dir):
    torch.manual_seed(0)
    dm = CaptionImageDataModule(train=str(shapes_dir / "train-*.tar"), fields=["image", "caption"], batch_size=16,
                                image_size=64, shuffle=False)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    module = ClipPretrainModule("unclip-tiny")
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    losses = []
    for _ in range(25):
        z_img, z_txt, scale = module.encode(batch["image"], batch["caption"])
        loss = module.loss_fn(z_img, z_txt, scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
