"""MMDialog (official ``conversations.json``) -> image-response retrieval with 1,000 candidates per dialogue.

Input: ``<split>/conversations.json`` (a JSON list, or one conversation object per line) with
``{"conversation_id", "conversation": [{"turn": [{"__TEXT__": str} | {"__MEDIA__": key}, ...]}, ...],
"negative_candidate_media_keys": [999 keys], "negative_candidate_texts": [...]}``; images are
``<split>/<media_key>.jpg``. The last turn is the response; the turns before it are the context.

Output: pool ``mmdialog_images`` (every candidate image once, ``did`` = media key) and the evaluation
``mmdialog_image_response``: one query per conversation whose response has an image. The query's elements
(texts and images of the context, oldest first, at most ``max_context`` of them) are written as sides
``ctx.0 ... ctx.{n-2}`` plus ``query`` (the last element). Meta ``candidates`` = the response's first image +
the 999 negatives (the official candidate set). Skips (no image in the response, missing/broken positive,
missing candidate images) are counted in ``<out>/convert_report.json``.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from unimm.data.benchmark import BenchmarkWriter
from unimm.data.convert.cc3m import REPORT_FILE, check_image
from unimm.data.records import Item, make_sample


def read_conversations(path: str | Path) -> list[dict]:
    text = Path(path).read_text()
    stripped = text.lstrip()
    if stripped.startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def elements(turn: dict) -> list[tuple[str, str]]:
    return [("text", e["__TEXT__"]) if "__TEXT__" in e else ("media", e["__MEDIA__"]) for e in turn["turn"]]


def convert_mmdialog(split_dir: str | Path, out: str | Path, max_context: int = 16, shard_size: int = 1000) -> dict:
    split_dir = Path(split_dir)
    conversations = read_conversations(split_dir / "conversations.json")
    skipped: Counter = Counter()
    images: dict[str, bytes] = {}

    def image(key: str) -> bytes | None:
        if key not in images:
            data, reason = check_image(split_dir / f"{key}.jpg")
            if reason:
                skipped[f"candidate_{reason}"] += 1
                return None
            images[key] = data
        return images[key]

    queries = []
    for conv in conversations:
        turns = conv["conversation"]
        response = elements(turns[-1])
        media = [v for kind, v in response if kind == "media"]
        if not media:
            skipped["no_image_response"] += 1
            continue
        if image(media[0]) is None:
            skipped["positive_image_unusable"] += 1
            continue
        context = [el for turn in turns[:-1] for el in elements(turn)][-max_context:]
        items = []
        for kind, value in context:
            if kind == "text":
                items.append(Item(text=value))
            elif image(value) is not None:
                items.append(Item(image=value))
            else:
                skipped["context_image_dropped"] += 1
        if not items:
            skipped["empty_context"] += 1
            continue
        candidates = [media[0]] + [k for k in conv.get("negative_candidate_media_keys", []) if image(k) is not None]
        queries.append((str(conv["conversation_id"]), items, candidates))
    bench = BenchmarkWriter(out, name="mmdialog")
    with bench.pool_writer("mmdialog_images", max_count=shard_size, converter="mmdialog") as w:
        for key in sorted(images):
            w.write(make_sample(f"m{key.replace('-', 'n')}", {"did": key, "modality": "image", "dataset": "mmdialog"},
                                image_format="jpg", cand=(None, images[key])))
    name = "mmdialog_image_response"
    with bench.query_writer(name, max_count=shard_size, converter="mmdialog") as w:
        for cid, items, candidates in queries:
            sides = {f"ctx_{i}": (it.text, images[it.image] if it.image else None) for i, it in enumerate(items[:-1])}
            last = items[-1]
            sides["query"] = (last.text, images[last.image] if last.image else None)
            w.write(make_sample(f"c{cid}", {"qid": f"c{cid}", "dataset": "mmdialog", "candidates": candidates,
                                            "pos_cand_list": [candidates[0]]}, image_format="jpg", **sides))
    bench.write_qrels(name, [f"c{cid} 0 {cands[0]} 1 0" for cid, _, cands in queries])
    bench.add_evaluation(name, dataset="mmdialog", task="image_response", query_modality="image,text",
                         cand_modality="image", pool="mmdialog_images")
    bench.save()
    report = {"file": str(split_dir / "conversations.json"), "lines": len(conversations), "kept": len(queries),
              "skipped": dict(skipped)}
    (Path(out) / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    print(f"[mmdialog] {len(conversations)} conversations, {len(queries)} kept, skipped {dict(skipped)}")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unimm.data.convert.mmdialog")
    parser.add_argument("--split-dir", required=True, help="MMDialog test/ (or valid/) folder")
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-context", type=int, default=16)
    args = parser.parse_args(argv)
    convert_mmdialog(args.split_dir, args.out, args.max_context)


if __name__ == "__main__":
    main()
