"""MMDialog (official ``conversations.json``) -> response retrieval, images and texts, 1,000 candidates each.

Input: ``<split>/conversations.json`` (a JSON list, or one conversation object per line) with
``{"conversation_id", "conversation": [{"turn": [{"__TEXT__": str} | {"__MEDIA__": key}, ...]}, ...],
"negative_candidate_media_keys": [999 keys], "negative_candidate_texts": [999 texts]}``; images are
``<split>/<media_key>.jpg``. The last turn is the response; the turns before it are the context.

The official metric (victorsungo/MMDialog ``EvaluationExample.md``) aligns the response's textual (resp. visual)
elements left to right with the predicted ones and averages a per-element recall over the ground-truth elements
of that modality. So every response element is one query here: element j of modality m ranks its own
candidates, the element itself + the 999 negatives of that modality (``meta["candidates"]``, the positive
first; a negative identical to the element is left out, it would tie with it); ``meta["response"]`` groups the elements of one response for the average. The query is the dialogue
context before the response turn (its texts and images, oldest first, at most ``max_context`` elements),
written as sides ``ctx.0 ... ctx.{n-2}`` plus ``query`` (the last element); the response's own earlier elements
are not given (UNIMUR's ``eval_mmdialog.py`` is not public: this is our choice).

Output: pools ``mmdialog_images`` (every usable image once, ``did`` = media key) and ``mmdialog_texts`` (every
distinct candidate text once, ``did`` = ``t`` + 16 hex digits of its SHA-1); evaluations
``mmdialog_image_response`` and ``mmdialog_text_response``. Skips (missing or broken images, checked at
``--verify-images`` level (:mod:`unimm.data.image_files`), empty texts, conversations without any context) are
counted in ``<out>/convert_report.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections import Counter
from pathlib import Path

from unimm.data.benchmark import BenchmarkWriter
from unimm.data.convert.cc3m import REPORT_FILE
from unimm.data.image_files import DEFAULT_VERIFY, add_verify_argument, check_image, check_verify
from unimm.data.records import Item, make_sample

IMAGE_EVAL, TEXT_EVAL = "mmdialog_image_response", "mmdialog_text_response"


def read_conversations(path: str | Path) -> list[dict]:
    text = Path(path).read_text()
    stripped = text.lstrip()
    if stripped.startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def elements(turn: dict) -> list[tuple[str, str]]:
    return [("text", e["__TEXT__"]) if "__TEXT__" in e else ("media", e["__MEDIA__"]) for e in turn["turn"]]


def text_id(text: str) -> str:
    """Stable candidate id of a response text (texts repeat across conversations and are stored once)."""
    return "t" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def convert_mmdialog(split_dir: str | Path, out: str | Path, max_context: int = 16, shard_size: int = 1000,
                     verify_images: str = DEFAULT_VERIFY) -> dict:
    check_verify(verify_images)
    split_dir = Path(split_dir)
    conversations = read_conversations(split_dir / "conversations.json")
    skipped: Counter = Counter()
    images: dict[str, bytes] = {}
    texts: dict[str, str] = {}  # did -> text

    def image(key: str) -> bytes | None:
        if key not in images:
            data, error = check_image(split_dir / f"{key}.jpg", verify_images)
            if error:
                skipped[f"candidate_{error.reason}"] += 1
                return None
            images[key] = data
        return images[key]

    def text(value: str) -> str | None:
        if not value.strip():
            skipped["empty_text"] += 1
            return None
        did = text_id(value)
        texts[did] = value
        return did

    queries: dict[str, list] = {IMAGE_EVAL: [], TEXT_EVAL: []}  # (qid, response id, context items, candidates)
    for conv in conversations:
        turns = conv["conversation"]
        cid = f"c{conv['conversation_id']}"
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
        response = elements(turns[-1])
        image_negs = [k for k in conv.get("negative_candidate_media_keys", []) if image(k) is not None]
        text_negs = [d for d in map(text, conv.get("negative_candidate_texts", [])) if d is not None]
        for j, key in enumerate(v for kind, v in response if kind == "media"):
            if image(key) is None:
                skipped["positive_image_unusable"] += 1
                continue
            queries[IMAGE_EVAL].append((f"{cid}i{j}", cid, items, [key] + [k for k in image_negs if k != key]))
        for j, value in enumerate(v for kind, v in response if kind == "text"):
            did = text(value)
            if did is not None:
                queries[TEXT_EVAL].append((f"{cid}t{j}", cid, items, [did] + [d for d in text_negs if d != did]))

    bench = BenchmarkWriter(out, name="mmdialog")
    with bench.pool_writer("mmdialog_images", max_count=shard_size, converter="mmdialog") as w:
        for key in sorted(images):
            w.write(make_sample(f"m{key.replace('-', 'n')}", {"did": key, "modality": "image", "dataset": "mmdialog"},
                                image_format="jpg", cand=(None, images[key])))
    with bench.pool_writer("mmdialog_texts", max_count=shard_size, converter="mmdialog") as w:
        for did in sorted(texts):
            w.write(make_sample(did, {"did": did, "modality": "text", "dataset": "mmdialog"}, cand=Item(text=texts[did])))
    for name, pool, modality in ((IMAGE_EVAL, "mmdialog_images", "image"), (TEXT_EVAL, "mmdialog_texts", "text")):
        with bench.query_writer(name, max_count=shard_size, converter="mmdialog") as w:
            for qid, response, items, candidates in queries[name]:
                sides = {f"ctx_{i}": (it.text, images[it.image] if it.image else None) for i, it in enumerate(items[:-1])}
                last = items[-1]
                sides["query"] = (last.text, images[last.image] if last.image else None)
                w.write(make_sample(qid, {"qid": qid, "dataset": "mmdialog", "response": response,
                                          "candidates": candidates, "pos_cand_list": [candidates[0]]},
                                    image_format="jpg", **sides))
        bench.write_qrels(name, [f"{qid} 0 {cands[0]} 1 0" for qid, _, _, cands in queries[name]])
        bench.add_evaluation(name, dataset="mmdialog", task=f"{modality}_response", query_modality="image,text",
                             cand_modality=modality, pool=pool)
    bench.save()
    kept = {response for qs in queries.values() for _, response, _, _ in qs}
    report = {"file": str(split_dir / "conversations.json"), "lines": len(conversations), "kept": len(kept),
              "image_queries": len(queries[IMAGE_EVAL]), "text_queries": len(queries[TEXT_EVAL]),
              "skipped": dict(skipped), "verify_images": verify_images}
    (Path(out) / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    print(f"[mmdialog] {len(conversations)} conversations, {len(kept)} kept ({report['image_queries']} image and "
          f"{report['text_queries']} text response elements), skipped {dict(skipped)}")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unimm.data.convert.mmdialog")
    parser.add_argument("--split-dir", required=True, help="MMDialog test/ (or valid/) folder")
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-context", type=int, default=16)
    add_verify_argument(parser)
    args = parser.parse_args(argv)
    convert_mmdialog(args.split_dir, args.out, args.max_context, verify_images=args.verify_images)


if __name__ == "__main__":
    main()
