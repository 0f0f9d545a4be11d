"""A small NLI triplet set over the toy captions, so that ``e5v_tiny`` runs on a fresh clone.

E5-V trains on SimCSE's NLI triplets (sent0, sent1 entailed, hard_neg contradicted). The toy version keeps that
shape with the toy's own words (the tiny tokenizer's vocabulary): the entailment keeps the digit and colour of
the premise and changes its size; the contradiction changes digit and colour. It goes through the real NLI
converter (:func:`unimm.data.convert.nli.convert_nli`) from a CSV written beside the shards.
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import shutil
from pathlib import Path

import numpy as np

from unimm.data.convert.nli import convert_nli
from unimm.data.toy import COLOURS, SIZES, caption, ensure_toy

TOY_NLI_VERSION = 1
INFO_FILE = "toy_nli.json"


def write_toy_nli_csv(path: str | os.PathLike, n: int, seed: int) -> None:
    """``n`` distinct triplets ``sent0,sent1,hard_neg`` over the toy captions (deterministic in ``seed``)."""
    colours = list(COLOURS)
    combos = [(d, c, s) for d in range(10) for c in range(len(colours)) for s in range(len(SIZES))]
    rng = np.random.default_rng([seed, 1])
    rows = []
    for i in range(n):
        d, c, s = combos[rng.integers(len(combos))] if i >= len(combos) else combos[i]
        d2 = (d + 1 + rng.integers(9)) % 10                          # another digit
        c2 = (c + 1 + rng.integers(len(colours) - 1)) % len(colours)  # another colour
        rows.append([caption(d, colours[c], SIZES[s]), caption(d, colours[c], SIZES[1 - s]),
                     caption(d2, colours[c2], SIZES[s])])
    order = rng.permutation(len(rows))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sent0", "sent1", "hard_neg"])
        writer.writerows(rows[i] for i in order)


def ensure_toy_nli(root: str | os.PathLike, toy_root: str | os.PathLike, seed: int = 0, n: int = 240) -> Path:
    """Build (once) the toy set at ``toy_root`` (its vocabulary feeds the tiny tokenizer) and the toy NLI shard set
    at ``root``; rebuilt when ``root/toy_nli.json`` records other parameters. Returns ``root``.

    ``n`` rows (the 120 digit x colour x size premises first, then random ones; an exact duplicate row is written
    once and counted by the converter).
    """
    ensure_toy(toy_root, seed=seed)
    root = Path(root)
    wanted = {"version": TOY_NLI_VERSION, "seed": seed, "n": n}
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.with_name(f".{root.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the ranks of one run build once
        info_path = root / INFO_FILE
        if info_path.is_file() and json.loads(info_path.read_text()).get("params") == wanted:
            return root
        tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_toy_nli_csv(tmp / "toy_nli.csv", n, seed)
        report = convert_nli(tmp / "toy_nli.csv", tmp / "shards", shard_size=100)
        for item in (tmp / "shards").iterdir():  # the shard set sits at root; the CSV it came from beside it
            os.replace(item, tmp / item.name)
        (tmp / "shards").rmdir()
        (tmp / INFO_FILE).write_text(json.dumps({"params": wanted, "report": report}, indent=1) + "\n")
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    return root
