"""On a machine with a CUDA GPU: every stage end to end on the GPU, then training throughput.

    python -m bench.gpu [out=DIR] [parts=throughput,end_to_end]

1. The demo's stages at smoke-test length, in ``bf16-mixed``, through the commands a user runs
   (``train.py``, ``python embed.py``, the pipeline's grids), under ``outputs/gpu/``. Each
   training log must say Lightning used the GPU.
2. Training steps/s of the module's real step (loss + backward + AdamW) on the GPU, fp32 next to bf16
   autocast: the diffusion prior at the paper-like bench size and the ``decoder_64`` UNet.

Prints one JSON line with both and writes it to ``DIR/gpu.json`` when ``out=`` is given.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from bench.decoder import NoCLIP
from bench.prior import PAPER_LIKE
from unclip.demo import ROOT, run_stages, sample_grids, stages, trained_priors

BF16 = ("trainer.precision=bf16-mixed",)
SMOKE = {
    "root": "outputs/gpu",
    "clip": ("trainer.max_steps=200", "trainer.val_check_interval=200", "data.batch_size=256", *BF16),
    "diffusion_prior": ("trainer.max_steps=300", "trainer.val_check_interval=300", *BF16),
    "ar_prior": ("trainer.max_steps=300", "trainer.val_check_interval=300", *BF16),
    "decoder": ("trainer.max_steps=600", "trainer.val_check_interval=600", "data.batch_size=64",
                "optim.optimizer.lr=1e-3", *BF16),
    "upsampler": ("trainer.max_steps=200", "trainer.val_check_interval=200", *BF16),
    "attributes": ("train.epochs=1",),
}


def end_to_end() -> dict:
    root = ROOT / SMOKE["root"]
    plan, timings = stages(SMOKE), {}
    run_stages(plan, jobs=2, logs=root / "demo" / "logs", timings=timings, cpus=os.cpu_count() or 2)
    used_gpu = {}
    for stage in plan:
        log = (root / "demo" / "logs" / f"{stage.name}.log")
        if stage.args[0] == "train.py" and log.exists():
            used_gpu[stage.name] = "GPU available: True (cuda), used: True" in log.read_text()
    grids = sample_grids(root, timings, trained_priors(plan), decoder_steps=50)
    return {"stage_seconds": timings, "lightning_used_gpu": used_gpu, "grids": grids}


def steps_per_s(module, batch: dict, precision: str, steps: int = 20) -> float:
    module.cuda().train()
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    optimizer = torch.optim.AdamW(module.net.parameters(), lr=1e-4, fused=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    for step in range(steps + 3):  # three warm-up steps: cuDNN/cuBLAS choose their kernels
        if step == 3:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with autocast:
            loss = module.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def prior(batch: int) -> tuple:
    from unclip.modules.diffusion_prior import DiffusionPriorModule

    dim, tokens = PAPER_LIKE["dim"], PAPER_LIKE["tokens"]
    net = {"embed_dim": dim, "text_width": dim, "max_text_tokens": tokens, "dim": dim, "depth": PAPER_LIKE["depth"],
           "heads": PAPER_LIKE["heads"], "ff_mult": 4}
    module = DiffusionPriorModule(net, {"schedule": "cosine", "num_timesteps": 1000, "prediction": "x0"}, {"steps": 64})
    data = {"img_emb": torch.randn(batch, dim), "txt_emb": torch.randn(batch, dim),
            "txt_tok": torch.randn(batch, tokens, dim), "key": [str(i) for i in range(batch)]}
    return module, data


def decoder_64(batch: int) -> tuple:
    """conf/model/decoder_64.yaml's UNet (without the caption tokens, which need a CLIP)."""
    from unclip.modules.decoder import DecoderModule

    net = {"image_size": 64, "channels": 192, "channel_mult": [1, 2, 3, 4], "num_res_blocks": 3,
           "attention_resolutions": [32, 16, 8], "head_channels": 64, "embed_dim": 512, "context_tokens": 4, "groups": 32}
    module = DecoderModule(net, {"schedule": "cosine", "prediction": "eps"}, {"steps": 50}, clip=NoCLIP())
    data = {"image": torch.rand(batch, 3, 64, 64) * 2 - 1, "img_emb": torch.randn(batch, 512), "caption": [""] * batch}
    return module, data


def throughput() -> list[dict]:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
    rows = []
    for name, build, batch in [("diffusion prior, paper-like", prior, 64), ("diffusion prior, paper-like", prior, 512),
                               ("decoder_64 UNet", decoder_64, 16), ("decoder_64 UNet", decoder_64, 64)]:
        torch.manual_seed(0)
        module, data = build(batch)
        params = sum(p.numel() for p in module.net.parameters())
        rates = {precision: steps_per_s(module, data, precision) for precision in ("fp32", "bf16")}
        rows.append({"model": name, "batch": batch, "params_M": round(params / 1e6, 1),
                     **{f"{p}_steps_per_s": round(r, 2) for p, r in rates.items()},
                     "bf16_speedup": round(rates["bf16"] / rates["fp32"], 2),
                     "bf16_samples_per_s": round(rates["bf16"] * batch)})
        del module
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str]) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench.gpu needs a CUDA GPU")
    args = dict(a.split("=", 1) for a in argv)
    out = Path(args["out"]) if "out" in args else None
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    for part in args.get("parts", "throughput,end_to_end").split(","):
        report[part] = {"throughput": throughput, "end_to_end": end_to_end}[part]()
        print(json.dumps(report), flush=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
