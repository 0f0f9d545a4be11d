"""Command line of the converters: ``python -m unimm.data.convert <format> ...``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from unimm.data.image_files import add_verify_argument


def _ks(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(k) for k in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 1,5,10, got {text!r}"
        ) from err


WORKERS_HELP = ("processes that read images and write shards (default: the cores); the output is the same "
                "bytes whatever the number")


def _workers(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a number of processes >= 1, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m unimm.data.convert",
        description="Convert public dataset formats into unimm shard sets and benchmark folders. "
        "Skipped samples are counted by reason in <out>/convert_report.json.",
        epilog="More formats, each with its own --help: " + ", ".join(sorted(DELEGATED)) + ".",
    )
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")

    mbeir = formats.add_parser(
        "mbeir",
        help="M-BEIR (UniIR) JSONL queries + candidate pool (+ qrels)",
        description="Convert M-BEIR query JSONL, candidate pool JSONL and qrels. Image paths in the JSONL files "
        "are relative to the M-BEIR root given with --images.",
    )
    modes = mbeir.add_subparsers(dest="mode", required=True, metavar="MODE")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--queries",
        required=True,
        help="query JSONL (qid, query_txt, query_img_path, query_modality, pos_cand_list, ...)",
    )
    common.add_argument(
        "--pool", required=True, help="candidate pool JSONL (did, txt, img_path, modality, ...)"
    )
    common.add_argument(
        "--images", required=True, help="M-BEIR root folder that img_path / query_img_path are relative to"
    )
    common.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first problem (missing or broken image, "
        "malformed line, positive not in the pool) with an error naming the file and the sample",
    )
    common.add_argument("--shard-size", type=int, default=1000, help="records per tar shard (default 1000)")
    common.add_argument("--workers", type=_workers, default=None, help=WORKERS_HELP)
    add_verify_argument(common)

    train = modes.add_parser(
        "train",
        parents=[common],
        help="training pairs: one record per query with its first positive candidate",
        description="Write a training shard set: side query, side pos (the first positive of pos_cand_list found "
        "in the pool), meta with qid, dataset, task, modalities, pos_cand_list and neg_cand_list. "
        "The folder --out is replaced.",
    )
    train.add_argument("--out", required=True, help="output shard set folder (replaced)")

    evaluation = modes.add_parser(
        "eval",
        parents=[common],
        help="add one evaluation (queries + pool + qrels) to a benchmark folder",
        description="Add an evaluation to the benchmark folder --out: writes pools/<pool-name> (kept when already "
        "converted from the same pool file), queries/<name>, qrels/<name>.txt and the entry in benchmark.json. "
        "Call it once per evaluation; the calls can share a pool and a benchmark folder.",
    )
    evaluation.add_argument("--name", required=True, help="evaluation name, e.g. mscoco_task0")
    evaluation.add_argument(
        "--qrels", required=True, help="qrels text file: 'qid 0 did rel task_id' per line"
    )
    evaluation.add_argument(
        "--out", required=True, help="benchmark folder (created, or extended when it exists)"
    )
    evaluation.add_argument(
        "--pool-name", default=None, help="pool name in the benchmark (default: the pool file's stem)"
    )
    evaluation.add_argument(
        "--ks", type=_ks, default=(1, 5, 10), help="recall cutoffs, comma-separated (default 1,5,10)"
    )
    evaluation.add_argument(
        "--report-k", type=int, default=5, help="the cutoff reported in summary tables (default 5)"
    )

    everything = modes.add_parser(
        "all",
        help="the whole benchmark in one command: training set, 16 local evaluations (and so the global pool)",
        description="Prepare M-BEIR from the official release folder (the HF dataset TIGER-Lab/M-BEIR, unpacked): "
        "<out>/train/union_up from query/union_train/mbeir_union_up_train.jsonl and "
        "cand_pool/global/mbeir_union_train_cand_pool.jsonl; <out>/instructions/query_instructions.tsv; "
        "<out>/eval_local with the 16 test evaluations (query/test/mbeir_<name>_test.jsonl, "
        "cand_pool/local/mbeir_<pool>_cand_pool.jsonl, qrels/test/mbeir_<name>_test_qrels.txt) at the paper's "
        "cutoffs (R@5; R@10 of 10,20,50 for Fashion200K and FashionIQ). eval=mbeir_global searches the union of "
        "these pools. Parts already converted from the same files are kept; an interrupted run resumes.",
    )
    everything.add_argument("--root", required=True, help="the M-BEIR release folder (mbeir_images/, query/, ...)")
    everything.add_argument("--out", required=True, help="output folder, e.g. data/mbeir (= ${paths.data_dir}/mbeir)")
    everything.add_argument(
        "--only", type=lambda t: t.split(","), default=None,
        help="comma-separated subset of 'train' and the evaluation names (e.g. train,mscoco_task0)",
    )
    everything.add_argument("--strict", action="store_true", help="stop at the first problem")
    everything.add_argument("--shard-size", type=int, default=1000, help="records per tar shard (default 1000)")
    everything.add_argument("--workers", type=_workers, default=None, help=WORKERS_HELP)
    add_verify_argument(everything)

    toy = formats.add_parser(
        "toy",
        help="build the bundled toy dataset (coloured sklearn digits; no download)",
        description="Build the toy dataset: <out>/train (shard set), <out>/eval (benchmark), vocab.txt, toy.json.",
    )
    toy.add_argument("--out", required=True, help="output folder (replaced)")
    toy.add_argument("--seed", type=int, default=0)
    toy.add_argument("--image-size", type=int, default=32)
    toy.add_argument("--n-train-per-task", type=int, default=1000)
    toy.add_argument("--n-eval-queries", type=int, default=200)
    toy.add_argument("--n-pool-images", type=int, default=600)
    return parser


# formats whose converter module has its own command line: `python -m unimm.data.convert cc3m --help`
DELEGATED = {
    "cc3m": "unimm.data.convert.cc3m",
    "visdial": "unimm.data.convert.visdial",
    "mmdialog": "unimm.data.convert.mmdialog",
    "vlmo_arrow": "unimm.data.convert.vlmo_arrow",
    "mmeb": "unimm.data.convert.mmeb",
    "nli": "unimm.data.convert.nli",
}


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        importlib.import_module(DELEGATED[argv[0]]).main(argv[1:])
        return
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _run(args)
    except (ValueError, FileNotFoundError) as err:
        # bad input (strict-mode problems, missing files, malformed qrels): a message, not a traceback
        parser.exit(2, f"error: {type(err).__name__}: {err}\n")
    except KeyboardInterrupt:
        parser.exit(130, "interrupted: the finished shards are kept (in .<out>.partial beside the output); "
                         "run the same command again to resume\n")


def _run(args: argparse.Namespace) -> None:
    # converters are imported only when chosen: the toy one loads scikit-learn
    if args.format == "toy":
        from unimm.data.toy import build_toy

        build_toy(
            args.out,
            seed=args.seed,
            image_size=args.image_size,
            n_train_per_task=args.n_train_per_task,
            n_eval_queries=args.n_eval_queries,
            n_pool_images=args.n_pool_images,
        )
        return
    from unimm.data.convert import mbeir

    if args.mode == "all":
        mbeir.convert_all(
            args.root, args.out, only=args.only, strict=args.strict, shard_size=args.shard_size,
            workers=args.workers, verify_images=args.verify_images,
        )
    elif args.mode == "train":
        mbeir.convert_train(
            args.queries, args.pool, args.images, args.out, strict=args.strict, shard_size=args.shard_size,
            workers=args.workers, verify_images=args.verify_images,
        )
    else:
        mbeir.convert_eval(
            args.name,
            args.queries,
            args.pool,
            args.qrels,
            args.images,
            args.out,
            pool_name=args.pool_name,
            ks=args.ks,
            report_k=args.report_k,
            strict=args.strict,
            shard_size=args.shard_size,
            workers=args.workers,
            verify_images=args.verify_images,
        )


if __name__ == "__main__":
    main()
