"""CLIP ViT-B/16 training throughput and MFU in bf16 on one GPU (UniIR score-fusion step: both towers, InfoNCE).

Random weights (the step costs the same); batch of image+text pairs at 224x224 and 77 tokens. FLOPs of one
step are counted with torch's FlopCounterMode; MFU = achieved FLOP/s / peak bf16 dense FLOP/s of the device
(--peak-tflops, default 989 for an H100 SXM). Prints one JSON line. Needs CUDA.

    python experiments/benchmarks/bench_clip_gpu.py [--batch 256] [--steps 20]
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPConfig, CLIPModel

from unimm.losses import InfoNCE
from unimm.methods.uniir import UniIRModule


def vit_b16() -> CLIPModel:
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77),
        vision_config=dict(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072,
                           num_hidden_layers=12, num_attention_heads=12),
        projection_dim=512,
    )
    config._attn_implementation = "sdpa"
    return CLIPModel(config)


def batch_of(n: int, device) -> dict:
    def side():
        return {"size": n, "input_ids": torch.randint(1, 49000, (n, 77), device=device),
                "attention_mask": torch.ones(n, 77, dtype=torch.long, device=device),
                "text_rows": torch.arange(n, device=device), "image_rows": torch.arange(n, device=device),
                "pixel_values": torch.randn(n, 3, 224, 224, device=device)}
    return {"keys": [str(i) for i in range(n)], "query": side(), "pos": side()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args()
    if not torch.cuda.is_available():  # `make bench` on a CPU machine: say so instead of failing
        print(json.dumps({"benchmark": "clip_vit_b16_bf16_train", "skipped": "needs a CUDA GPU"}))
        return
    device = torch.device("cuda")
    module = UniIRModule(vit_b16(), InfoNCE(temperature=None), functools.partial(torch.optim.AdamW, lr=1e-5)).to(device)
    optimizer = module.optimizer_factory(module.parameters())
    batch = batch_of(args.batch, device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = module.compute_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    print(json.dumps({
        "benchmark": "clip_vit_b16_bf16_train", "device": torch.cuda.get_device_name(), "batch": args.batch,
        "samples_per_s": round(args.batch / seconds, 1), "step_s": round(seconds, 4),
        "tflops_per_step": round(flops / 1e12, 2), "achieved_tflops": round(flops / seconds / 1e12, 1),
        "mfu": round(flops / seconds / (args.peak_tflops * 1e12), 3),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }))


if __name__ == "__main__":
    main()
