"""``python -m unimm.clustering extract|cluster|assign ...``: the three offline clustering steps.

Example (the toy data, an untrained tiny CLIP score-fusion teacher)::

    python -m unimm.clustering extract --shards data/toy/train --out data/toy/train/clusters/features \\
        --experiment uniir_clip_sf_tiny --image-sides pos query --text-sides query pos -o paths.data_dir=data
    python -m unimm.clustering cluster --features data/toy/train/clusters/features --k 64 \\
        --out data/toy/train/clusters/centroids.npy
    python -m unimm.clustering assign --features data/toy/train/clusters/features \\
        --centroids data/toy/train/clusters/centroids.npy --top-l 8 --out data/toy/train/clusters/labels
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch


def _teacher(args) -> tuple[torch.nn.Module, object]:
    """The teacher module and its processor: a trained run's checkpoint, or an experiment's (untrained) model."""
    if args.ckpt:
        from unimm.checkpoints import load_run

        run = load_run(args.ckpt)
        return run.module, run.processor
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from unimm.runtime import CONF_DIR

    with initialize_config_dir(config_dir=os.path.abspath(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"+experiment={args.experiment}", *args.override], return_hydra_config=False)
    return instantiate(cfg.model).eval(), instantiate(cfg.processor)


def _extract(args) -> dict:
    from unimm.clustering.kmeans import TeacherCollator, extract_features

    module, processor = _teacher(args)
    device = torch.device(args.device)
    module = module.to(device).eval()
    collate = TeacherCollator(processor, args.image_sides, args.text_sides)
    return extract_features(args.shards, module.encode_candidate, collate, args.out, chunk_size=args.chunk_size,
                            batch_size=args.batch_size, num_workers=args.num_workers, dtype=args.dtype, device=device)


def _cluster(args) -> dict:
    from unimm.clustering.kmeans import train_kmeans

    centroids = train_kmeans(args.features, args.k, args.out, sample_size=args.sample_size, niter=args.niter,
                             seed=args.seed, gpu=args.gpu)
    return {"centroids": args.out, "k": int(len(centroids)), "dim": int(centroids.shape[1])}


def _assign(args) -> dict:
    from unimm.clustering.kmeans import assign

    out = assign(args.features, np.load(args.centroids, allow_pickle=False), args.out, num=args.top_l,
                 chunk_size=args.chunk_size, gpu=args.gpu)
    return json.loads((out / "clusters.json").read_text()) | {"labels": str(out)}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m unimm.clustering", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("extract", help="embed a shard set with a teacher encoder into feature chunks")
    e.add_argument("--shards", required=True, help="the shard set folder (with index.json)")
    e.add_argument("--out", required=True, help="features folder to write")
    teacher = e.add_mutually_exclusive_group(required=True)
    teacher.add_argument("--ckpt", help="a unimm run checkpoint: its module's encode_candidate is the teacher")
    teacher.add_argument("--experiment", help="an experiment whose (untrained or pretrained) model is the teacher")
    e.add_argument("-o", "--override", nargs="*", default=[], help="Hydra overrides for --experiment")
    e.add_argument("--image-sides", nargs="+", default=["pos", "query"], help="record sides holding the image")
    e.add_argument("--text-sides", nargs="*", default=[], help="record sides whose text joins the image feature")
    e.add_argument("--chunk-size", type=int, default=100_000)
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--num-workers", type=int, default=2)
    e.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    e.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")

    c = sub.add_parser("cluster", help="spherical faiss k-means on a sample of the features")
    c.add_argument("--features", required=True)
    c.add_argument("--k", type=int, required=True, help="number of clusters (UNICOM / MLCD: 1M)")
    c.add_argument("--out", required=True, help="centroids .npy to write (a .json with the settings beside it)")
    c.add_argument("--sample-size", type=int, default=1_000_000)
    c.add_argument("--niter", type=int, default=20)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--gpu", action="store_true")

    a = sub.add_parser("assign", help="top-l nearest centres of every sample, written as a labels folder")
    a.add_argument("--features", required=True)
    a.add_argument("--centroids", required=True)
    a.add_argument("--out", required=True, help="labels folder (keys.npy, labels.npy, clusters.json)")
    a.add_argument("--top-l", type=int, default=8, help="MLCD: 8, UNICOM: 1")
    a.add_argument("--chunk-size", type=int, default=65_536)
    a.add_argument("--gpu", action="store_true")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    result = {"extract": _extract, "cluster": _cluster, "assign": _assign}[args.command](args)
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
