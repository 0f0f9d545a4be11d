"""VisDial v1.0 (official JSON) -> a dialogue/image retrieval benchmark, both directions, rounds 1..10.

Input: ``visdial_1.0_val.json`` (``{"data": {"questions": [...], "answers": [...], "dialogs": [{"image_id",
"caption", "dialog": [{"question": i, "answer": j, ...}]}]}}``) and the image folder with
``VisualDialog_val2018_<image_id:012d>.jpg``. A dialogue of r rounds is written as FROMAGe's
``evals/eval_visdial_retrieval.py`` does: ``"Q: q1? A: a1. Q: q2? A: a2. ..."`` (the collator appends [RET]);
``--caption`` prefixes the VisDial caption (FROMAGe's script does not).

Benchmark (``unimm.data.benchmark`` layout), per round r:

- ``visdial_d2i_r{r}``: dialogue (first r rounds) -> image over the pool ``visdial_images`` (true
  dialogue->image retrieval);
- ``visdial_i2d_r{r}``: image -> dialogue over the pool ``visdial_dialogs_r{r}`` (what FROMAGe's script computes:
  its ``scores`` are images x dialogues with top-k per image row).

Dialogues whose image is missing or broken (checked at ``--verify-images`` level, :mod:`unimm.data.image_files`)
are skipped and counted in ``<out>/convert_report.json``.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from unimm.data.benchmark import BenchmarkWriter
from unimm.data.convert.cc3m import REPORT_FILE
from unimm.data.image_files import DEFAULT_VERIFY, add_verify_argument, check_image, check_verify
from unimm.data.records import Item, make_sample

ROUNDS = tuple(range(1, 11))


def dialogue_text(questions: list[str], answers: list[str], turns: list[dict], rounds: int, caption: str | None) -> str:
    parts = [caption.strip() + "."] if caption else []
    for turn in turns[:rounds]:
        parts += [f"Q: {questions[turn['question']]}?", f"A: {answers[turn['answer']]}."]
    return " ".join(parts)


def convert_visdial(json_path: str | Path, image_dir: str | Path, out: str | Path, rounds=ROUNDS,
                    split: str = "val2018", caption: bool = False, shard_size: int = 1000,
                    verify_images: str = DEFAULT_VERIFY) -> dict:
    check_verify(verify_images)
    data = json.loads(Path(json_path).read_text())["data"]
    questions, answers, dialogs = data["questions"], data["answers"], data["dialogs"]
    image_dir = Path(image_dir)
    skipped: Counter = Counter()
    kept = []  # (did, image bytes, dialog)
    for dialog in dialogs:
        name = f"VisualDialog_{split}_{int(dialog['image_id']):012d}.jpg"
        image, error = check_image(image_dir / name, verify_images)
        if error:
            skipped[error.reason] += 1
            continue
        kept.append((str(dialog["image_id"]), image, dialog))
    bench = BenchmarkWriter(out, name="visdial")
    with bench.pool_writer("visdial_images", max_count=shard_size, converter="visdial") as w:
        for did, image, _ in kept:
            w.write(make_sample(f"img{did}", {"did": did, "modality": "image", "dataset": "visdial"},
                                image_format="jpg", cand=(None, image)))
    for r in rounds:
        texts = {did: dialogue_text(questions, answers, d["dialog"], r, d.get("caption") if caption else None)
                 for did, _, d in kept}
        d2i, i2d, pool = f"visdial_d2i_r{r}", f"visdial_i2d_r{r}", f"visdial_dialogs_r{r}"
        with bench.query_writer(d2i, max_count=shard_size, converter="visdial") as w:
            for did, _, _ in kept:
                w.write(make_sample(f"dlg{did}", {"qid": f"dlg{did}", "dataset": "visdial", "round": r,
                                                  "pos_cand_list": [did]}, query=Item(text=texts[did])))
        bench.write_qrels(d2i, [f"dlg{did} 0 {did} 1 0" for did, _, _ in kept])
        bench.add_evaluation(d2i, dataset="visdial", task=f"d2i_r{r}", query_modality="text",
                             cand_modality="image", pool="visdial_images")
        with bench.pool_writer(pool, max_count=shard_size, converter="visdial") as w:
            for did, _, _ in kept:
                w.write(make_sample(f"dlg{did}", {"did": f"dlg{did}", "modality": "text", "dataset": "visdial"},
                                    cand=Item(text=texts[did])))
        with bench.query_writer(i2d, max_count=shard_size, converter="visdial") as w:
            for did, image, _ in kept:
                w.write(make_sample(f"img{did}", {"qid": f"img{did}", "dataset": "visdial", "round": r},
                                    image_format="jpg", query=(None, image)))
        bench.write_qrels(i2d, [f"img{did} 0 dlg{did} 1 0" for did, _, _ in kept])
        bench.add_evaluation(i2d, dataset="visdial", task=f"i2d_r{r}", query_modality="image",
                             cand_modality="text", pool=pool)
    bench.save()
    report = {"file": str(json_path), "lines": len(dialogs), "kept": len(kept), "skipped": dict(skipped),
              "verify_images": verify_images}
    (Path(out) / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    print(f"[visdial] {len(dialogs)} dialogues, {len(kept)} kept, skipped {dict(skipped)}")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unimm.data.convert.visdial")
    parser.add_argument("--json", required=True, help="visdial_1.0_val.json")
    parser.add_argument("--images", required=True, help="VisualDialog_val2018 folder")
    parser.add_argument("--out", required=True)
    parser.add_argument("--caption", action="store_true", help="prefix the VisDial caption to each dialogue")
    add_verify_argument(parser)
    args = parser.parse_args(argv)
    convert_visdial(args.json, args.images, args.out, caption=args.caption, verify_images=args.verify_images)


if __name__ == "__main__":
    main()
