"""Shard stream over loopback HTTP vs UniIR-style per-file GETs from the same server, and vs local shards.

One corpus (20k records: 64x64 JPEG + caption, as bench_data_loader.py) is written both as one image file per
record (+ JSONL) and as 1,000-record shards. A separate process serves the folder over HTTP/1.1 on 127.0.0.1
(Python's ThreadingHTTPServer, keep-alive). Three loaders, 2 DataLoader workers each, batches of 64, every
image decoded to RGB:

- per_file: UniIR's layout read over HTTP: the JSONL in memory, one GET per image (fsspec's HTTP client, one
  keep-alive session per worker: the same client the shard reader uses);
- http_shards: unimm's ShardStream over ``http://127.0.0.1:<port>/shards`` (one streaming GET per shard);
- local_shards: the same ShardStream over the shards on local disk (memory-mapped).

Runs alternate (so load from other processes hits all alike) and the best of each is kept. Prints one JSON
line with samples/s and the two ratios of issue 17 (targets: http vs per-file >= 3x; http vs local >= 0.8x).

    python experiments/benchmarks/bench_remote_shards.py [--n 20000] [--workers 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data_loader import _list_collate, _passthrough, _records_collate, make_data, run  # noqa: E402

from unimm.data.remote import RemoteOptions  # noqa: E402
from unimm.data.shards import read_index  # noqa: E402
from unimm.data.stream import ShardStream, Source  # noqa: E402

SERVER = """
import functools, http.server, sys
class Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # TCP_NODELAY, as production servers: else each small GET waits ~40 ms
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=sys.argv[1]))
print(server.server_address[1], flush=True)
server.serve_forever()
"""


class PerFileHttpDataset(Dataset):
    """UniIR-style over HTTP: all JSONL rows in memory; each item GETs and decodes its own image file."""

    def __init__(self, root: Path, url: str):
        self.url = url
        self.rows = [json.loads(line) for line in open(root / "queries.jsonl")]
        self._fs = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if self._fs is None:  # one client (and keep-alive session) per worker process
            import fsspec

            self._fs = fsspec.filesystem("http")
        row = self.rows[i]
        data = self._fs.cat_file(f"{self.url}/{row['query_img_path']}")
        with Image.open(io.BytesIO(data)) as image:
            return row["query_txt"], image.convert("RGB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_data(root, args.n, args.shard_size)
        server = subprocess.Popen([sys.executable, "-c", SERVER, str(root)], stdout=subprocess.PIPE, text=True)
        try:
            url = f"http://127.0.0.1:{int(server.stdout.readline())}"

            def shard_loader(location: str) -> DataLoader:
                # the training path: shards split over workers, shuffle buffer, decode, batches of --batch
                stream = ShardStream([Source(read_index(location))], args.batch, _records_collate, train=True,
                                     required_sides=("query", "pos"), shuffle_buffer=args.shuffle_buffer,
                                     remote=RemoteOptions())
                stream.configure(0, 1, args.workers)
                return DataLoader(stream, batch_size=None, num_workers=args.workers, collate_fn=_passthrough)

            loaders = {
                "per_file": DataLoader(PerFileHttpDataset(root, url), batch_size=args.batch, shuffle=True,
                                       num_workers=args.workers, collate_fn=_list_collate),
                "http_shards": shard_loader(f"{url}/shards"),
                "local_shards": shard_loader(str(root / "shards")),
            }
            start = time.perf_counter()
            for name in ("http_shards", "local_shards"):  # warm the page cache (make_data just wrote the images)
                run(loaders[name])
            rates: dict[str, list[float]] = {name: [] for name in loaders}
            for _ in range(args.repeats):
                for name, loader in loaders.items():
                    rates[name].append(run(loader)[0])
            elapsed = time.perf_counter() - start
        finally:
            server.terminate()
            server.wait()
    best = {name: max(r) for name, r in rates.items()}
    print(json.dumps({
        "benchmark": "remote_shards", "records": args.n, "workers": args.workers, "batch": args.batch,
        "samples_per_s": {name: round(rate, 1) for name, rate in best.items()},
        "ratio_http_shards_vs_per_file_http": round(best["http_shards"] / best["per_file"], 3),
        "ratio_http_shards_vs_local_shards": round(best["http_shards"] / best["local_shards"], 3),
        # fsspec's HTTP open asks the size first: a HEAD and a GET per shard and for index.json
        "http_requests_per_1000_samples": {"per_file": 1000.0,
                                           "http_shards": round(1000 * 2 * (1 + args.n / args.shard_size) / args.n, 2)},
        "seconds_measuring": round(elapsed, 1),
    }))


if __name__ == "__main__":
    main()
