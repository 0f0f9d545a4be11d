"""Embedding throughput for texts of mixed lengths: length-sorted windows vs arrival order.

The same shard set of --n texts (5 to 75 words, uniformly mixed) is embedded by a CLIP text tower through the
evaluation path (ShardStream -> RetrievalCollator -> UniIRModule.encode_query), once in arrival order and once
with `sort_window` (batches of similar length pad less). Prints one JSON line with texts/s and the ratio.

    python experiments/benchmarks/bench_length_bucketing.py [--n 4000] [--batch 128] [--window 4096]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import CLIPConfig, CLIPModel

from unimm.data.collate import RetrievalCollator
from unimm.data.records import Item, make_sample
from unimm.data.shards import ShardSetWriter, read_index
from unimm.data.stream import ShardStream, Source
from unimm.losses import InfoNCE
from unimm.methods.uniir import UniIRModule
from unimm.models.processors import word_level_processor

WORDS = [f"w{i}" for i in range(500)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.txt").write_text("\n".join(WORDS))
        with ShardSetWriter(Path(tmp) / "texts", max_count=1000) as writer:
            for i in range(args.n):
                text = " ".join(rng.choice(WORDS, int(rng.integers(5, 76))))
                writer.write(make_sample(f"t{i:06d}", {}, query=Item(text=text)))
        processor = word_level_processor(str(Path(tmp) / "vocab.txt"), max_length=77)
        config = CLIPConfig(text_config=dict(vocab_size=len(WORDS) + 4, hidden_size=256, intermediate_size=1024,
                                             num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=77,
                                             eos_token_id=3, pad_token_id=0, bos_token_id=2),
                            vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=2), projection_dim=256)
        module = UniIRModule(CLIPModel(config), InfoNCE(temperature=None), optimizer=None).eval()
        index = read_index(Path(tmp) / "texts")

        def embed(window: int) -> float:
            stream = ShardStream([Source(index)], args.batch, RetrievalCollator(processor, sides=("query",)),
                                 train=False, required_sides=("query",), sort_window=window)
            stream.configure(0, 1, args.workers)
            loader = DataLoader(stream, batch_size=None, num_workers=args.workers, collate_fn=lambda b: b)
            start, count = time.perf_counter(), 0
            with torch.no_grad():
                for batch in loader:
                    count += len(module.encode_query(batch["query"]))
            return count / (time.perf_counter() - start)

        embed(0)  # warm-up
        arrival = max(embed(0) for _ in range(2))
        bucketed = max(embed(args.window) for _ in range(2))
    print(json.dumps({"benchmark": "length_bucketing", "texts": args.n, "batch": args.batch, "window": args.window,
                      "arrival_texts_per_s": round(arrival, 1), "sorted_texts_per_s": round(bucketed, 1),
                      "ratio_sorted_vs_arrival": round(bucketed / arrival, 3)}))


if __name__ == "__main__":
    main()
