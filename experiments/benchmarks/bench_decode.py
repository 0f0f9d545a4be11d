"""Decode + CLIP preprocessing (224 px) samples/s: full-size decode vs reduced-size JPEG decode, and decoding
every side vs only the sides the collator uses (issue 17, item 2).

Images: the photographs bundled with scikit-image, resized and stored as JPEG (quality 90) at each size. Per
size and processor (OpenAI CLIP's transform as UniIR uses it, and the HF CLIP image processor that UNICOM /
MLCD use), one run measures ``decode_sample`` + the processor with the exact decode and with
``DecodeHint(resize=<the processor's first resize>)``, and the pixel difference of the processor's output in
0..255 levels (max, mean). The sides row decodes records of query + pos + 4 hard negatives (500x375) for a
collator that uses query and pos. One thread, as in a data worker. One JSON line.

    python experiments/benchmarks/bench_decode.py [--repeat 20]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time

import numpy as np
import torch
from PIL import Image
from skimage import data

from unimm.data.collate import processor_resize_target
from unimm.data.records import DecodeHint, decode_sample
from unimm.models.image_processor import clip_image_processor
from unimm.models.official_transforms import OfficialImageTransform

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


def rate(raws: list[dict], hint: DecodeHint | None, images, repeat: int, sides=("cand",)) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        for raw in raws:
            record = decode_sample(raw, hint=hint)
            images([record.sides[s].image for s in sides])
    return repeat * len(raws) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    official, hf = OfficialImageTransform("openai_clip", 224), clip_image_processor(224)
    processors = {"openai_clip": (lambda ims: official(ims)["pixel_values"], processor_resize_target(official)),
                  "hf_clip": (hf.images, processor_resize_target(hf))}
    result: dict[str, object] = {"images": len(NAMES), "repeat": args.repeat, "load_avg_1min": os.getloadavg()[0]}
    for width, height in ((500, 375), (640, 480), (1000, 750)):
        raws = [{"__key__": f"k{i}", "cand.jpg": b} for i, b in enumerate(jpegs(width, height))]
        for name, (images, target) in processors.items():
            reduced = DecodeHint(resize=target)
            rate(raws, None, images, 1)  # warm up
            full_rate = rate(raws, None, images, args.repeat)
            reduced_rate = rate(raws, reduced, images, args.repeat)
            diff = torch.cat([
                ((images([decode_sample(r).sides["cand"].image])
                  - images([decode_sample(r, hint=reduced).sides["cand"].image]))[0].abs() * CLIP_STD_255).flatten()
                for r in raws])
            result[f"{width}x{height}_{name}"] = {
                "full_samples_s": round(full_rate, 1), "reduced_samples_s": round(reduced_rate, 1),
                "speedup": round(reduced_rate / full_rate, 2),
                "max_abs_levels": round(diff.max().item(), 1), "mean_abs_levels": round(diff.mean().item(), 3),
            }
    images = jpegs(500, 375)
    records = [{"__key__": f"k{i}", "query.jpg": images[i], "pos.jpg": images[i - 1],
                **{f"neg.{j}.jpg": images[(i + j + 2) % len(images)] for j in range(4)}} for i in range(len(images))]
    every = rate(records, None, hf.images, args.repeat // 2, sides=("query", "pos"))
    used = rate(records, DecodeHint(("query", "pos")), hf.images, args.repeat // 2, sides=("query", "pos"))
    result["sides_query_pos_of_6"] = {"every_side_samples_s": round(every, 1), "used_sides_samples_s": round(used, 1),
                                      "speedup": round(used / every, 2)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
