"""Compiled (``model.compile=true``, inductor) vs eager training step on the tiny CLIP (UniIR) and tiny VLMo twins.

Both loops train the same model (same initial weights) on the same pre-collated toy batches held in memory, so
data loading is not measured. Before timing, the first step's loss and gradients of the compiled model are
checked against eager (the numbers are worthless if they differ). Compilation time is reported separately;
throughput is steady state (clock from step ``--warmup``). Prints one JSON line per model with steps/s of each
and the ratio (target >= 1.0).

    python experiments/benchmarks/bench_compile.py [--steps 40] [--warmup 5] [--models uniir_clip_sf_tiny,vlmo_tiny]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from unimm.training.compile import CompileSettings

CONF = Path(__file__).resolve().parents[2] / "conf"


def build(experiment: str, root: Path, n_batches: int):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"+experiment={experiment}", f"paths.data_dir={root}/data",
                                          f"paths.root_dir={root}", f"paths.output_dir={root}/run", "data.num_workers=0"])
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.attach_processor(instantiate(cfg.processor))
    datamodule.setup("fit")
    batches = []
    while len(batches) < n_batches:
        for batch in datamodule.train_dataloader():
            batches.append(batch)
            if len(batches) == n_batches:
                break
    torch.manual_seed(0)
    eager = instantiate(cfg.model)
    torch.manual_seed(0)
    compiled = instantiate(cfg.model)
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled, batches


def step(module, optimizer, batch) -> torch.Tensor:
    loss, _ = module.compute_loss(batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def first_step_difference(eager, compiled, batch) -> dict[str, float]:
    results = []
    for module in (eager, compiled):
        module.train()
        torch.manual_seed(1)
        loss, _ = module.compute_loss(batch)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}))
        module.zero_grad(set_to_none=True)
    (loss_e, grads_e), (loss_c, grads_c) = results
    return {"loss_abs_diff": abs(loss_e - loss_c),
            "grad_max_abs_diff": max((grads_e[n] - grads_c[n]).abs().max().item() for n in grads_e)}


def steps_per_second(module, batches, warmup: int) -> float:
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    module.train()
    for i, batch in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        step(module, optimizer, batch)
    return (len(batches) - warmup) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--models", default="uniir_clip_sf_tiny,vlmo_tiny")
    parser.add_argument("--recompile-limit", type=int, default=CompileSettings.recompile_limit,
                        help="model.compile.recompile_limit (graphs per block function before eager)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_compile_"))
    for experiment in args.models.split(","):
        eager, compiled, batches = build(experiment, root, args.steps)
        started = time.perf_counter()
        compiled.compile_settings = CompileSettings(enabled=True, backend="inductor", fallback=False,
                                                   recompile_limit=args.recompile_limit)
        compiled.configure_model()
        check = first_step_difference(eager, compiled, batches[0])  # the first compiled call pays for compilation
        compile_seconds = time.perf_counter() - started
        eager_rate = steps_per_second(eager, batches, args.warmup)
        compiled_rate = steps_per_second(compiled, batches, args.warmup)
        print(json.dumps({"model": experiment, "eager_steps_per_s": round(eager_rate, 2),
                          "compiled_steps_per_s": round(compiled_rate, 2), "ratio": round(compiled_rate / eager_rate, 3),
                          "compile_s": round(compile_seconds, 1), **{k: float(f"{v:.2e}") for k, v in check.items()},
                          "threads": torch.get_num_threads(),
                          "recompile_limit": args.recompile_limit}), flush=True)


if __name__ == "__main__":
    main()
