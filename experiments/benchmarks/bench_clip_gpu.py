"""CLIP ViT-B/16 training throughput and MFU in bf16 on one GPU (UniIR score-fusion step: both towers, InfoNCE).

Random weights (the step costs the same); batch of image+text pairs at 224x224 and 77 tokens. FLOPs of one
step are counted with torch's FlopCounterMode; MFU = achieved FLOP/s / peak bf16 dense FLOP/s of the device
(--peak-tflops, default 989 for an H100 SXM; 989 for an H200 too). The eager step is timed first, then the same
module with ``model.compile=true``'s regional compile (inductor, every transformer block; compile time reported
apart), so the JSON line carries both MFUs and their ratio from one run. AdamW is fused on CUDA. Needs CUDA
(``--device cpu --batch 2 --steps 1`` only smoke-tests the script).

    python experiments/benchmarks/bench_clip_gpu.py [--batch 256] [--steps 20] [--no-compile]
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
from unimm.training.compile import CompileSettings, compile_blocks


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


def seconds_per_step(step, steps: int, device) -> float:
    for _ in range(2):  # warm up (the first compiled call compiles)
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-compile", action="store_true", help="time the eager step only")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():  # `make bench` on a CPU machine: say so
        print(json.dumps({"benchmark": "clip_vit_b16_bf16_train", "skipped": "needs a CUDA GPU"}))
        return
    fused = {"fused": True} if device.type == "cuda" else {}
    module = UniIRModule(vit_b16(), InfoNCE(temperature=None),
                         functools.partial(torch.optim.AdamW, lr=1e-5, **fused)).to(device)
    optimizer = module.optimizer_factory(module.parameters())
    batch = batch_of(args.batch, device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _ = module.compute_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()

    def figures(seconds: float) -> dict:
        return {"samples_per_s": round(args.batch / seconds, 1), "step_s": round(seconds, 4),
                "achieved_tflops": round(flops / seconds / 1e12, 1),
                "mfu": round(flops / seconds / (args.peak_tflops * 1e12), 3)}

    result = {"benchmark": "clip_vit_b16_bf16_train", "device": torch.cuda.get_device_name() if device.type == "cuda"
              else args.device, "batch": args.batch, "tflops_per_step": round(flops / 1e12, 2)}
    result["eager"] = figures(seconds_per_step(step, args.steps, device))
    if not args.no_compile:
        started = time.perf_counter()
        report = compile_blocks(module, CompileSettings(enabled=True, fallback=False))
        step()  # compiles
        result["compile_s"] = round(time.perf_counter() - started, 1)
        result["compiled_blocks"] = len(report.compiled)
        result["compiled"] = figures(seconds_per_step(step, args.steps, device))
        result["compiled_vs_eager"] = round(result["eager"]["step_s"] / result["compiled"]["step_s"], 3)
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
