"""Our Lightning training step vs a bare PyTorch loop: same tiny CLIP, same batches, same optimizer.

Both train on identical pre-collated batches held in memory (so data loading is not measured). Steady-state
throughput: each loop's clock starts at step ``--warmup`` (the first steps of a fresh model pay for allocator
warm-up in both loops; Lightning's one-off ``fit`` set-up is reported separately) and stops after the last
step. Prints one JSON line with steps/s of each and the ratio (target >= 0.9).

    python experiments/benchmarks/bench_train_loop.py [--steps 60] [--batch 64]
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from unimm.data.collate import RetrievalCollator
from unimm.data.datamodule import ShardDataModule
from unimm.data.records import decode_sample
from unimm.data.shards import iter_raw_samples, read_index
from unimm.data.toy import ensure_toy
from unimm.losses import InfoNCE
from unimm.methods.uniir import UniIRModule
from unimm.models.clip import tiny_clip
from unimm.models.processors import word_level_processor


def make_batches(root: Path, batch: int, n_batches: int) -> list[dict]:
    toy = ensure_toy(root / "toy")
    collate = RetrievalCollator(word_level_processor(str(toy / "vocab.txt")), sides=("query", "pos"))
    records = [decode_sample(raw) for shard in read_index(toy / "train").shards for raw in iter_raw_samples(shard.path)]
    per_epoch = len(records) // batch  # cycle through the records when more steps than one epoch are asked
    return [collate(records[(i % per_epoch) * batch : (i % per_epoch + 1) * batch]) for i in range(n_batches)]


def build(vocab: str) -> UniIRModule:
    return UniIRModule(tiny_clip(vocab), InfoNCE(temperature=None),
                       functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.05))


def bare_loop(module: UniIRModule, batches: list[dict], warmup: int) -> float:
    optimizer = module.optimizer_factory(module.parameters())
    module.train()
    for i, batch in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        loss, _ = module.compute_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (len(batches) - warmup) / (time.perf_counter() - start)


class _StepClock(L.Callback):
    """Times steps ``warmup..end`` of the fit loop, and the set-up before the first step."""

    def __init__(self, warmup: int):
        self.warmup = warmup

    def setup(self, trainer, pl_module, stage):
        self.fit_called = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.setup_seconds = time.perf_counter() - self.fit_called
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end, self.steps = time.perf_counter(), batch_idx + 1 - self.warmup


def _passthrough(batch: dict) -> dict:
    return batch


class _Batches(L.LightningDataModule):
    """The loader below, moved to the device as ShardDataModule moves batches (its transfer hook)."""

    transfer_batch_to_device = ShardDataModule.transfer_batch_to_device

    def __init__(self, loader):
        super().__init__()
        self.loader = loader

    def train_dataloader(self):
        return self.loader


def lightning_loop(module: UniIRModule, batches: list[dict], warmup: int) -> tuple[float, float]:
    """Returns (steady-state steps/s, seconds of set-up before the first step)."""
    clock = _StepClock(warmup)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[clock])
    # the DataLoader as ShardDataModule builds it: batches pass through as collated
    loader = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=_passthrough)
    trainer.fit(module, datamodule=_Batches(loader))
    return clock.steps / (clock.end - clock.start), clock.setup_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        batches = make_batches(Path(tmp), args.batch, args.steps + args.warmup)
        vocab = str(Path(tmp) / "toy" / "vocab.txt")
        bare, lit, setup = [], [], []
        for _ in range(args.repeats):  # alternate so background load hits both alike; keep the best of each
            bare.append(bare_loop(build(vocab), batches, args.warmup))
            rate, seconds = lightning_loop(build(vocab), batches, args.warmup)
            lit.append(rate)
            setup.append(seconds)
    print(json.dumps({"benchmark": "train_loop", "steps": args.steps, "batch": args.batch,
                      "bare_steps_per_s": round(max(bare), 2), "lightning_steps_per_s": round(max(lit), 2),
                      "ratio_lightning_vs_bare": round(max(lit) / max(bare), 3),
                      "lightning_fit_setup_s": round(min(setup), 3)}))


if __name__ == "__main__":
    main()
