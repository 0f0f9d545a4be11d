"""Decode + CLIP preprocessing (224 px) samples/s: full-size decode vs reduced-size JPEG decode, and decoding
every side vs only the sides the collator uses (issue 17, item 2).

Images: the photographs bundled with scikit-image, resized and stored as JPEG (quality 90) at each size. Per
size, one run measures ``decode_sample`` + the CLIP processor with and without ``DecodeHint(min_size=224)``
and the pixel difference of the processor's output in 0..255 levels (max, mean). The sides row decodes
records of query + pos + 4 hard negatives (500x375) for a collator that uses query and pos. One JSON line.

    python experiments/benchmarks/bench_decode.py [--repeat 20]
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
import torch
from PIL import Image
from skimage import data

from unimm.data.records import DecodeHint, decode_sample
from unimm.models.image_processor import clip_image_processor

NAMES = ("astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field", "immunohistochemistry")
CLIP_STD_255 = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(3, 1, 1) * 255


def jpegs(width: int, height: int) -> list[bytes]:
    out = []
    for name in NAMES:
        a = getattr(data, name)()
        a = np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]
        buf = io.BytesIO()
        Image.fromarray(a).resize((width, height), Image.BICUBIC).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def rate(raws: list[dict], hint: DecodeHint | None, processor, repeat: int, sides=("cand",)) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        for raw in raws:
            record = decode_sample(raw, hint=hint)
            processor.images([record.sides[s].image for s in sides])
    return repeat * len(raws) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    processor = clip_image_processor(224)
    result: dict[str, object] = {"images": len(NAMES), "repeat": args.repeat}
    for width, height in ((500, 375), (640, 480), (1000, 750)):
        raws = [{"__key__": f"k{i}", "cand.jpg": b} for i, b in enumerate(jpegs(width, height))]
        reduced = DecodeHint(min_size=224)
        rate(raws, None, processor, 1)  # warm up
        full_rate = rate(raws, None, processor, args.repeat)
        reduced_rate = rate(raws, reduced, processor, args.repeat)
        diff = torch.cat([
            ((processor.images([decode_sample(r).sides["cand"].image])
              - processor.images([decode_sample(r, hint=reduced).sides["cand"].image]))[0].abs() * CLIP_STD_255).flatten()
            for r in raws])
        decoded = decode_sample(raws[0], hint=reduced).sides["cand"].image.size
        result[f"{width}x{height}"] = {
            "decoded_at": f"{decoded[0]}x{decoded[1]}", "full_samples_s": round(full_rate, 1),
            "reduced_samples_s": round(reduced_rate, 1), "speedup": round(reduced_rate / full_rate, 2),
            "max_abs_levels": round(diff.max().item(), 1), "mean_abs_levels": round(diff.mean().item(), 3),
        }
    images = jpegs(500, 375)
    records = [{"__key__": f"k{i}", "query.jpg": images[i], "pos.jpg": images[i - 1],
                **{f"neg.{j}.jpg": images[(i + j + 2) % len(images)] for j in range(4)}} for i in range(len(images))]
    every = rate(records, None, processor, args.repeat // 2, sides=("query", "pos"))
    used = rate(records, DecodeHint(("query", "pos")), processor, args.repeat // 2, sides=("query", "pos"))
    result["sides_query_pos_of_6"] = {"every_side_samples_s": round(every, 1), "used_sides_samples_s": round(used, 1),
                                      "speedup": round(used / every, 2)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
