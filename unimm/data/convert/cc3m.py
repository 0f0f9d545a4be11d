"""CC3M in FROMAGe's TSV layout -> training shards.

Input (FROMAGe ``datasets/cc3m_{train,val}.tsv``): a header row ``caption<TAB>image`` then one
``caption<TAB>image file name`` per line; the files live in ``image_dir``. Each kept line becomes a record with
``query.txt`` (the caption) and ``pos.<ext>`` (the image bytes as they are), key = hash of the file name, meta
``{"dataset": "cc3m", "image": name}``. Missing and broken images (checked at ``--verify-images`` level, see
:mod:`unimm.data.image_files`), empty captions and malformed lines are skipped, counted by reason, and written to
``<out>/convert_report.json`` with a few examples.

    python -m unimm.data.convert.cc3m --tsv datasets/cc3m_train.tsv --images data/cc3m/training --out shards/cc3m_train
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
from collections import Counter
from pathlib import Path

from unimm.data.image_files import DEFAULT_VERIFY, add_verify_argument, check_image, check_verify
from unimm.data.records import IMAGE_EXTS, Item, make_sample
from unimm.data.shards import ShardSetWriter

REPORT_FILE = "convert_report.json"


def stable_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:20]


def convert_cc3m(tsv: str | Path, image_dir: str | Path, out: str | Path, shard_size: int = 1000,
                 caption_key: str = "caption", image_key: str = "image", verify_images: str = DEFAULT_VERIFY) -> dict:
    """Convert one TSV; returns the report ``{"lines", "kept", "skipped": {reason: n}, "examples": {reason: [...]},
    "verify_images"}`` (``verify_images``: how image files are checked, :mod:`unimm.data.image_files`)."""
    check_verify(verify_images)
    image_dir, out = Path(image_dir), Path(out)
    skipped: Counter = Counter()
    examples: dict[str, list[str]] = {}
    lines = kept = 0

    def skip(reason: str, what: str) -> None:
        skipped[reason] += 1
        examples.setdefault(reason, [])
        if len(examples[reason]) < 5:
            examples[reason].append(what)

    with open(tsv, newline="", encoding="utf-8") as f, ShardSetWriter(out, max_count=shard_size, source=str(tsv),
                                                                          converter="cc3m") as writer:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if caption_key not in (reader.fieldnames or []) or image_key not in (reader.fieldnames or []):
            raise ValueError(f"{tsv}: header must name '{caption_key}' and '{image_key}', got {reader.fieldnames}")
        for row in reader:
            lines += 1
            caption, name = (row.get(caption_key) or "").strip(), (row.get(image_key) or "").strip()
            if not name:
                skip("malformed_line", f"line {lines + 1}")
                continue
            if not caption:
                skip("empty_caption", name)
                continue
            data, error = check_image(image_dir / name, verify_images)
            if error:
                skip(error.reason, f"{name}: {error.detail}")
                continue
            ext = Path(name).suffix.lower().lstrip(".")
            ext = "jpg" if ext in ("jpeg", "") or ext not in IMAGE_EXTS else ext
            writer.write(make_sample(stable_key(name), {"dataset": "cc3m", "image": name}, image_format=ext,
                                     query=Item(text=caption), pos=(None, data)))
            kept += 1
    report = {"file": str(tsv), "lines": lines, "kept": kept, "skipped": dict(skipped), "examples": examples,
              "verify_images": verify_images}
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    print(f"[cc3m] {tsv}: {lines} lines, {kept} kept, {sum(skipped.values())} skipped {dict(skipped)}")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unimm.data.convert.cc3m", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tsv", required=True)
    parser.add_argument("--images", required=True, help="folder the image file names are relative to")
    parser.add_argument("--out", required=True)
    parser.add_argument("--shard-size", type=int, default=1000)
    add_verify_argument(parser)
    args = parser.parse_args(argv)
    convert_cc3m(args.tsv, args.images, args.out, args.shard_size, verify_images=args.verify_images)


if __name__ == "__main__":
    main()
