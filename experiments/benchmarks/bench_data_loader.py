"""Shard loader vs per-file loader (the way UniIR reads M-BEIR: JSONL in memory, one image file per sample).

Both read the same records (64x64 JPEG + caption), decode every image to RGB and deliver batches of 64 with
2 DataLoader workers from a warm page cache. Prints one JSON line: samples/s of each, the ratio, and the
file opens per 1,000 samples (what dominates on network file systems).

    python experiments/benchmarks/bench_data_loader.py [--n 20000] [--workers 2] [--batch 64]
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from unimm.data.records import Item, make_sample
from unimm.data.shards import ShardSetWriter, read_index
from unimm.data.stream import ShardStream, Source


def make_data(root: Path, n: int, shard_size: int) -> None:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    lines = []
    with ShardSetWriter(root / "shards", max_count=shard_size, source="bench") as writer:
        for i in range(n):
            pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
            jpeg = buf.getvalue()
            caption = f"a photo number {i} of something"
            (root / "images" / f"{i:07d}.jpg").write_bytes(jpeg)
            lines.append(json.dumps({"qid": f"0:{i}", "query_txt": caption, "query_img_path": f"images/{i:07d}.jpg"}))
            writer.write(make_sample(f"s{i:07d}", {"qid": f"0:{i}"}, image_format="jpg", query=Item(text=caption), pos=(None, jpeg)))
    (root / "queries.jsonl").write_text("\n".join(lines) + "\n")


class PerFileDataset(Dataset):
    """UniIR-style: all JSONL rows in memory; each item opens and decodes its own image file."""

    def __init__(self, root: Path):
        self.root = root
        self.rows = [json.loads(line) for line in open(root / "queries.jsonl")]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        with Image.open(self.root / row["query_img_path"]) as image:
            return row["query_txt"], image.convert("RGB")


def _list_collate(items):
    return items


def _records_collate(records):
    return {"keys": [r.key for r in records], "items": [(r.sides["query"].text, r.sides["pos"].image) for r in records]}


def _passthrough(batch):
    return batch


def run(loader) -> tuple[float, int]:
    start = time.perf_counter()
    seen = sum(len(batch) if isinstance(batch, list) else len(batch["keys"]) for batch in loader)
    return seen / (time.perf_counter() - start), seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_data(root, args.n, args.shard_size)
        per_file = DataLoader(PerFileDataset(root), batch_size=args.batch, shuffle=True, num_workers=args.workers,
                              collate_fn=_list_collate)
        # the training path: shards split over workers, shuffle buffer, decode, batches of --batch
        stream = ShardStream([Source(read_index(root / "shards"))], args.batch, _records_collate, train=True,
                             required_sides=("query", "pos"), shuffle_buffer=args.shuffle_buffer)
        stream.configure(0, 1, args.workers)
        shards = DataLoader(stream, batch_size=None, num_workers=args.workers, collate_fn=_passthrough)
        # warm the page cache for both layouts, then alternate the two (so load from other processes hits
        # both alike) and keep the best of each
        run(per_file), run(shards)
        rates = {"per_file": [], "shards": []}
        for _ in range(args.repeats):
            rates["per_file"].append(run(per_file)[0])
            rates["shards"].append(run(shards)[0])
        per_file_rate, shard_rate = max(rates["per_file"]), max(rates["shards"])
        n_shards = len(read_index(root / "shards").shards)
    print(json.dumps({
        "benchmark": "data_loader", "records": args.n, "workers": args.workers, "batch": args.batch,
        "per_file_samples_per_s": round(per_file_rate, 1), "shard_samples_per_s": round(shard_rate, 1),
        "ratio_shard_vs_per_file": round(shard_rate / per_file_rate, 3),
        "file_opens_per_1000_samples": {"per_file": 1000.0, "shards": round(1000 * n_shards / args.n, 2)},
    }))


if __name__ == "__main__":
    main()
