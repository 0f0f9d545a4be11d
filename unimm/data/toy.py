"""The bundled toy dataset: coloured handwritten digits with captions, built offline in seconds.

The images are the 1797 real 8x8 digits of scikit-learn's ``load_digits`` (16 grey levels), each rendered as
an ``image_size`` x ``image_size`` RGB image with two attributes: a colour (the digit's intensity tints the
colour on black) and a size (``large`` fills the canvas, ``small`` takes half of it at a random offset).
Caption: ``"a large red digit seven"``. Three tasks with different modality pairs, as in M-BEIR:

    t2i   caption              -> image of that digit, colour and size
    i2t   image                -> its caption
    it2i  image + "make it X"  -> an image of another instance of the same digit with one attribute changed

Layout under ``root``::

    train/       shard set, 3 x n_train_per_task records (tasks interleaved): query / pos sides + instruction.txt,
                 meta {"dataset": "toy", "task", "qid", "digit", "colour", "size", "instances"}
    eval/        benchmark (see unimm.data.benchmark): pools toy_images (n_pool_images renderings of eval
                 instances), toy_captions (all 120 captions); evaluations toy_t2i, toy_i2t, toy_it2i with
                 n_eval_queries queries each; qrels list every pool candidate that shows the target attributes
    vocab.txt    every word of every caption, modification and instruction, sorted, one per line
    toy.json     {"version", "params", "counts", "seconds"}

Digit instances are split by seed into train (~70%) and eval (~30%) instances: eval images never show a
digit drawing seen in training. In every meta, ``digit``/``colour``/``size`` describe the positive (the
target), and ``instances`` lists the ``load_digits`` indices of the images the record shows.
"""

from __future__ import annotations

import fcntl
import inspect
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from unimm.data.benchmark import BenchmarkWriter
from unimm.data.convert.mbeir import TASK_IDS
from unimm.data.records import Item, make_sample
from unimm.data.shards import ShardSetWriter

# bump when the rendering or sampling changes, so that ensure_toy rebuilds old copies
TOY_VERSION = 2
# Small shards so that every rank and worker gets several (shards are the unit of splitting).
TRAIN_SHARD_SIZE = 100
EVAL_SHARD_SIZE = 200

COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
}
SIZES = ("small", "large")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TASKS = {  # task -> (query modality, candidate modality), M-BEIR modality strings
    "t2i": ("text", "image"),
    "i2t": ("image", "text"),
    "it2i": ("image,text", "image"),
}
INSTRUCTIONS = {
    "t2i": "retrieve an image that matches the caption",
    "i2t": "find the caption that describes the image",
    "it2i": "retrieve the image after applying the change",
}
TRAIN_FRACTION = 0.7

Attrs = tuple[int, str, str]  # (digit, colour, size)


def caption(digit: int, colour: str, size: str) -> str:
    return f"a {size} {colour} digit {DIGIT_WORDS[digit]}"


def modification_texts() -> list[str]:
    return [f"make it {word}" for word in (*COLOURS, *SIZES)]


def split_instances(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split the ``load_digits`` indices per digit into (train, eval) index arrays, ~70/30, by seed."""
    from sklearn.datasets import load_digits

    target = load_digits().target
    rng = np.random.default_rng([seed, 0])
    train, evaluation = [], []
    for digit in range(10):
        ids = rng.permutation(np.flatnonzero(target == digit))
        cut = round(TRAIN_FRACTION * len(ids))
        train.append(ids[:cut])
        evaluation.append(ids[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(evaluation))


class _Renderer:
    """Renders digit instances; holds the 8x8 images (N, 8, 8) in [0, 16] and their labels (N,)."""

    def __init__(self, image_size: int):
        from sklearn.datasets import load_digits

        digits = load_digits()
        self.images = digits.images
        self.target = digits.target
        self.image_size = image_size

    def digit(self, instance: int) -> int:
        return int(self.target[instance])

    def render(self, instance: int, colour: str, size: str, rng: np.random.Generator) -> Image.Image:
        side = self.image_size if size == "large" else self.image_size // 2
        grey = Image.fromarray(np.round(self.images[instance] * (255 / 16)).astype(np.uint8), "L")
        grey = np.asarray(grey.resize((side, side), Image.BILINEAR), dtype=np.float32) / 255
        tinted = grey[..., None] * np.asarray(COLOURS[colour], dtype=np.float32)  # (side, side, 3)
        canvas = np.zeros((self.image_size, self.image_size, 3), dtype=np.uint8)
        y, x = (0, 0) if side == self.image_size else rng.integers(0, self.image_size - side + 1, size=2)
        canvas[y : y + side, x : x + side] = np.round(tinted).astype(np.uint8)
        return Image.fromarray(canvas, "RGB")


_COLOUR_NAMES = tuple(COLOURS)


def _random_attrs(rng: np.random.Generator) -> tuple[str, str]:
    return _COLOUR_NAMES[rng.integers(len(_COLOUR_NAMES))], SIZES[rng.integers(len(SIZES))]


def _modify(colour: str, size: str, rng: np.random.Generator) -> tuple[str, str, str]:
    """Change exactly one attribute; returns (modification text, new colour, new size)."""
    if rng.random() < 0.5:
        new = str(rng.choice([c for c in COLOURS if c != colour]))
        return f"make it {new}", new, size
    new = SIZES[1 - SIZES.index(size)]
    return f"make it {new}", colour, new


def _train_samples(renderer: _Renderer, train_ids: np.ndarray, n_per_task: int, seed: int):
    """Yield training samples with the three tasks interleaved, so that every shard mixes all tasks."""
    rngs = {task: np.random.default_rng([seed, 1, i]) for i, task in enumerate(TASKS)}
    by_digit = {d: train_ids[renderer.target[train_ids] == d] for d in range(10)}
    for i in range(n_per_task):
        for task, rng in rngs.items():
            key = f"toy_{task}_{i:06d}"
            a = int(rng.choice(train_ids))
            digit = renderer.digit(a)
            colour, size = _random_attrs(rng)
            instances = [a]
            if task == "t2i":
                sides = {
                    "query": Item(text=caption(digit, colour, size)),
                    "pos": Item(image=renderer.render(a, colour, size, rng)),
                }
            elif task == "i2t":
                sides = {
                    "query": Item(image=renderer.render(a, colour, size, rng)),
                    "pos": Item(text=caption(digit, colour, size)),
                }
            else:
                text, colour2, size2 = _modify(colour, size, rng)
                b = int(rng.choice(by_digit[digit][by_digit[digit] != a]))
                instances.append(b)
                query = Item(text=text, image=renderer.render(a, colour, size, rng))
                sides = {"query": query, "pos": Item(image=renderer.render(b, colour2, size2, rng))}
                colour, size = colour2, size2
            meta = {
                "dataset": "toy",
                "task": task,
                "qid": key,
                "digit": digit,
                "colour": colour,
                "size": size,
                "instances": instances,
            }
            yield make_sample(key, meta, instruction=INSTRUCTIONS[task], **sides)


def _build_eval(
    bench: BenchmarkWriter, renderer: _Renderer, eval_ids: np.ndarray, n_queries: int, n_pool: int, seed: int
) -> dict:
    """Write the pools, query sets, qrels and benchmark.json; returns counts."""
    rng = np.random.default_rng([seed, 2])
    by_attrs: dict[Attrs, list[str]] = {}  # pool image dids per (digit, colour, size)
    pool_triples = set()  # (instance, colour, size) shown by the pool: i2t queries avoid them
    with bench.pool_writer(
        "toy_images", max_count=EVAL_SHARD_SIZE, source="sklearn load_digits", converter="unimm.data.toy"
    ) as w:
        # every eval instance once (in random order) before any is drawn again
        for i, inst in enumerate(np.resize(rng.permutation(eval_ids), n_pool)):
            inst, did = int(inst), f"toy_images_{i:06d}"
            colour, size = _random_attrs(rng)
            digit = renderer.digit(inst)
            by_attrs.setdefault((digit, colour, size), []).append(did)
            pool_triples.add((inst, colour, size))
            meta = {
                "did": did,
                "modality": "image",
                "dataset": "toy",
                "digit": digit,
                "colour": colour,
                "size": size,
                "instances": [inst],
            }
            w.write(make_sample(did, meta, cand=Item(image=renderer.render(inst, colour, size, rng))))
    caption_dids: dict[Attrs, str] = {}
    with bench.pool_writer("toy_captions", source="toy captions", converter="unimm.data.toy") as w:
        for attrs in ((d, c, s) for d in range(10) for c in COLOURS for s in SIZES):
            did = caption_dids[attrs] = f"toy_captions_{len(caption_dids):03d}"
            meta = {
                "did": did,
                "modality": "text",
                "dataset": "toy",
                "digit": attrs[0],
                "colour": attrs[1],
                "size": attrs[2],
            }
            w.write(make_sample(did, meta, cand=Item(text=caption(*attrs))))

    present = sorted(
        by_attrs
    )  # t2i uses only captions with >= 1 positive, cycling so that all are used evenly
    order = np.concatenate([rng.permutation(len(present)) for _ in range(-(-n_queries // len(present)))])

    def eval_instance() -> tuple[int, int, str, str]:
        inst = int(rng.choice(eval_ids))
        return (inst, renderer.digit(inst), *_random_attrs(rng))

    def t2i(i: int):
        attrs = present[order[i]]
        return Item(text=caption(*attrs)), by_attrs[attrs], attrs, []

    def i2t(i: int):
        inst, digit, colour, size = eval_instance()
        while (inst, colour, size) in pool_triples:  # a new rendering, not a pool image
            inst, digit, colour, size = eval_instance()
        query = Item(image=renderer.render(inst, colour, size, rng))
        return query, [caption_dids[digit, colour, size]], (digit, colour, size), [inst]

    def it2i(i: int):
        while True:
            inst, digit, colour, size = eval_instance()
            text, colour2, size2 = _modify(colour, size, rng)
            if (digit, colour2, size2) in by_attrs:  # only targets with >= 1 positive in the pool
                break
        query = Item(text=text, image=renderer.render(inst, colour, size, rng))
        return query, by_attrs[digit, colour2, size2], (digit, colour2, size2), [inst]

    counts = {"pools": {"toy_images": n_pool, "toy_captions": len(caption_dids)}, "evaluations": {}}
    for task, make_query in {"t2i": t2i, "i2t": i2t, "it2i": it2i}.items():
        name, (query_modality, cand_modality) = f"toy_{task}", TASKS[task]
        qrels = []
        with bench.query_writer(
            name, max_count=EVAL_SHARD_SIZE, source="sklearn load_digits", converter="unimm.data.toy"
        ) as w:
            for i in range(n_queries):
                qid = f"toy_{task}_eval_{i:06d}"
                query, positives, (digit, colour, size), instances = make_query(i)
                meta = {
                    "qid": qid,
                    "dataset": "toy",
                    "task": task,
                    "query_modality": query_modality,
                    "pos_cand_list": positives,
                    "digit": digit,
                    "colour": colour,
                    "size": size,
                    "instances": instances,
                }
                w.write(make_sample(qid, meta, instruction=INSTRUCTIONS[task], query=query))
                qrels += [f"{qid} 0 {did} 1 {TASK_IDS[query_modality, cand_modality]}" for did in positives]
        bench.write_qrels(name, qrels)
        pool = "toy_captions" if cand_modality == "text" else "toy_images"
        bench.add_evaluation(
            name,
            dataset="toy",
            task=task,
            query_modality=query_modality,
            cand_modality=cand_modality,
            pool=pool,
            ks=(1, 5, 10),
            report_k=5,
        )
        counts["evaluations"][name] = n_queries
    bench.save()
    return counts


def _vocab() -> list[str]:
    texts = [caption(d, c, s) for d in range(10) for c in COLOURS for s in SIZES]
    texts += modification_texts() + list(INSTRUCTIONS.values())
    return sorted({word for text in texts for word in text.lower().split()})


def build_toy(
    root: str | os.PathLike,
    seed: int = 0,
    image_size: int = 32,
    n_train_per_task: int = 1000,
    n_eval_queries: int = 200,
    n_pool_images: int = 600,
) -> Path:
    """Build the toy dataset at ``root`` (replacing what is there) and return ``root``.

    Everything is written into a temporary sibling folder that is renamed into place at the end, so a crash
    never leaves a half-built dataset. Deterministic given the parameters.
    """
    if n_pool_images < 1 or n_eval_queries < 1 or image_size < 2:
        raise ValueError("build_toy needs n_pool_images >= 1, n_eval_queries >= 1 and image_size >= 2")
    start = time.perf_counter()
    root = Path(root)
    params = {
        "seed": seed,
        "image_size": image_size,
        "n_train_per_task": n_train_per_task,
        "n_eval_queries": n_eval_queries,
        "n_pool_images": n_pool_images,
    }
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        renderer = _Renderer(image_size)
        train_ids, eval_ids = split_instances(seed)
        with ShardSetWriter(
            tmp / "train", max_count=TRAIN_SHARD_SIZE, source="sklearn load_digits", converter="unimm.data.toy"
        ) as w:
            for sample in _train_samples(renderer, train_ids, n_train_per_task, seed):
                w.write(sample)
        counts = {
            "train": len(TASKS) * n_train_per_task,
            "train_per_task": {t: n_train_per_task for t in TASKS},
            "train_instances": len(train_ids),
            "eval_instances": len(eval_ids),
        }
        counts.update(
            _build_eval(
                BenchmarkWriter(tmp / "eval", name="toy"),
                renderer,
                eval_ids,
                n_eval_queries,
                n_pool_images,
                seed,
            )
        )
        (tmp / "vocab.txt").write_text("\n".join(_vocab()) + "\n")
        seconds = round(time.perf_counter() - start, 2)
        info = {"version": TOY_VERSION, "params": params, "counts": counts, "seconds": seconds}
        (tmp / "toy.json").write_text(json.dumps(info, indent=1) + "\n")
        old = root.with_name(f".{root.name}.old-{os.getpid()}")
        if root.exists():
            os.replace(root, old)
        os.replace(tmp, root)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(
        f"toy dataset: {counts['train']} train records ({len(TASKS)} tasks), pools {counts['pools']}, "
        f"{sum(counts['evaluations'].values())} eval queries in {seconds:.1f}s -> {root}"
    )
    return root


def ensure_toy(root: str | os.PathLike, **params) -> Path:
    """Return ``root`` after building the toy dataset there unless ``root/toy.json`` has the same params.

    ``params`` are those of :func:`build_toy`. A lock file beside ``root`` makes concurrent callers (e.g. the
    ranks of one run) build once and wait for it.
    """
    root = Path(root)
    defaults = {k: p.default for k, p in inspect.signature(build_toy).parameters.items() if k != "root"}
    unknown = set(params) - set(defaults)
    if unknown:
        raise TypeError(f"ensure_toy got unknown parameters {sorted(unknown)}; known: {sorted(defaults)}")
    wanted = {**defaults, **params}
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.with_name(f".{root.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        info_path = root / "toy.json"
        if info_path.is_file():
            info = json.loads(info_path.read_text())
            if info.get("version") == TOY_VERSION and info.get("params") == wanted:
                return root
        return build_toy(root, **wanted)
