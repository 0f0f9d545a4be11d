"""VisDial and MMDialog evaluators end to end: official JSON fixtures -> our converters -> ``Evaluator.run``.

Known answers come from :class:`ColourModule` (a text embeds as its colour words, an image as its dominant
colour), whose rankings are fixed by construction; the tiny random FROMAGe model is checked against a plain
recall computed in the test from its own embeddings; both evaluators give identical metrics with 1 and 2 processes.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests._dist import run_distributed
from tests._word_modules import FixedEncoder
from tests.test_frozen_lm import build_module
from unimm.data.benchmark import load_benchmark, read_qrels
from unimm.data.caption_collate import FrozenLMCollator
from unimm.data.convert.mmdialog import convert_mmdialog
from unimm.data.convert.visdial import convert_visdial
from unimm.data.datamodule import ShardDataModule
from unimm.data.records import decode_sample
from unimm.data.shards import iter_raw_samples, read_index
from unimm.eval.dialog import MMDialogEvaluator, VisDialEvaluator
from unimm.models.frozen_lm import word_level_frozen_lm_processor

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
WORDS = ["q", "a", "what", "colour", "is", "it", "and", "now", "show", "me", "here", "something", *COLOURS]


def _jpg(path: Path, colour: str) -> None:
    Image.fromarray(np.full((8, 8, 3), COLOURS[colour], np.uint8)).save(path, format="JPEG", quality=100)


class ColourModule(FixedEncoder):
    """Known rankings: a sequence is ``sum_w weight(w) * onehot(colour w)`` over its colour words (the last one
    weighs 1, earlier ones 0.5); a lone image is the one-hot of its dominant channel. L2-normalised."""

    def __init__(self, colour_ids: list[int]):
        super().__init__()
        self.colour_ids = colour_ids

    def encode_query(self, side):
        out = torch.zeros(side["size"], len(self.colour_ids))
        for row, ids in zip(side["seq_rows"].tolist(), side.get("input_ids", torch.zeros(0, 0)).tolist()):
            found = [self.colour_ids.index(t) for t in ids if t in self.colour_ids]
            for n, c in enumerate(found):
                out[row, c] += 1.0 if n == len(found) - 1 else 0.5
        if len(side["image_rows"]):
            dominant = side["pixel_values"].mean((2, 3)).argmax(1)
            out[side["image_rows"]] = torch.nn.functional.one_hot(dominant, len(self.colour_ids)).float()
        return torch.nn.functional.normalize(out, dim=1)


# -- fixtures in the official layouts --------------------------------------------------------------------------
def write_visdial(root: Path) -> tuple[Path, Path]:
    """Dialogue i (image colour c_i) says c_i in round 1 and c_{i+1} in round 2."""
    images = root / "VisualDialog_val2018"
    images.mkdir(parents=True)
    names = list(COLOURS)
    questions, answers = ["what colour is it", "and now"], list(COLOURS)
    dialogs = []
    for i, colour in enumerate(names):
        _jpg(images / f"VisualDialog_val2018_{i + 1:012d}.jpg", colour)
        turns = [{"question": 0, "answer": i, "answer_options": [0, 1, 2], "gt_index": i},
                 {"question": 1, "answer": (i + 1) % 3, "answer_options": [0, 1, 2], "gt_index": (i + 1) % 3}]
        dialogs.append({"image_id": i + 1, "caption": f"a {colour} thing", "dialog": turns})
    path = root / "visdial_1.0_val.json"
    path.write_text(json.dumps({"version": "1.0", "split": "val2018",
                                "data": {"questions": questions, "answers": answers, "dialogs": dialogs}}))
    return path, images


def write_mmdialog(split: Path) -> None:
    """Four conversations; the context names a colour, the response holds texts and images."""
    split.mkdir(parents=True)
    for key, colour in {"r0": "red", "g0": "green", "b0": "blue", "r1": "red", "g1": "green", "b1": "blue"}.items():
        _jpg(split / f"{key}.jpg", colour)

    def conv(cid, context, texts, media, neg_media, neg_texts):
        return {"conversation_id": cid, "conversation": [
            {"turn": [{"__TEXT__": context}]},
            {"turn": [{"__TEXT__": t} for t in texts] + [{"__MEDIA__": m} for m in media]}],
            "negative_candidate_media_keys": neg_media, "negative_candidate_texts": neg_texts}

    conversations = [
        # two image elements: r0 beats b0 (hit); g0 ties with b0 at 0 (a tie is a miss at 1) -> 0.5 for it
        conv(0, "show me something red", ["here is red"], ["r0", "g0"], ["b0"], ["here is blue"]),
        conv(1, "show me something green", ["here is green"], ["g1"], ["r1", "b1"], ["here is red", "here is blue"]),
        conv(2, "show me something blue", ["here is blue"], ["b1"], ["r1", "g1"], ["here is red", "here is green"]),
        # the context asks for red, the response is blue: red and green rank before it (miss at 1, hit at 5)
        conv(3, "show me something red", ["here is blue"], ["b0"], ["r0", "g0"], ["here is red", "here is green"]),
    ]
    (split / "conversations.json").write_text(json.dumps(conversations))


def write_data(root: Path) -> None:
    path, images = write_visdial(root)
    convert_visdial(path, images, root / "visdial", rounds=(1, 2), shard_size=2)
    write_mmdialog(root / "mmdialog_test")
    convert_mmdialog(root / "mmdialog_test", root / "mmdialog", shard_size=2)
    (root / "vocab.txt").write_text("\n".join(WORDS) + "\n")


def datamodule(root: Path) -> ShardDataModule:
    dm = ShardDataModule({}, collator=partial(FrozenLMCollator, pair_sides=()), num_workers=0, eval_batch_size=2)
    dm.attach_processor(word_level_frozen_lm_processor(str(root / "vocab.txt"), max_length=64))
    return dm


def evaluators(root: Path):
    return (VisDialEvaluator(str(root / "visdial"), store_dtype="float32", grid_queries=0),
            MMDialogEvaluator(str(root / "mmdialog"), store_dtype="float32", grid_queries=0))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dialog")
    write_data(root)
    return root


# -- known answers -------------------------------------------------------------------------------------------
def test_known_answers(data, tmp_path):
    proc = word_level_frozen_lm_processor(str(data / "vocab.txt"))
    module = ColourModule(proc.tokenizer.convert_tokens_to_ids(list(COLOURS)))
    visdial, mmdialog = evaluators(data)
    got = visdial.run(module, datamodule(data), tmp_path / "v")
    # round 1 names each dialogue's own colour: every image and dialogue is found first
    for direction in ("d2i", "i2d"):
        assert got[f"val/visdial/visdial_{direction}_r1/hit@1"] == 100.0
    # round 2: dialogue i = 1 * c_{i+1} + 0.5 * c_i -> image i+1 first, its own image second (of 3)
    assert got["val/visdial/visdial_d2i_r2/hit@1"] == 0.0 and got["val/visdial/visdial_d2i_r2/hit@5"] == 100.0
    # image i scores dialogue i-1 (1) over its own (0.5)
    assert got["val/visdial/visdial_i2d_r2/hit@1"] == 0.0
    assert "| round 2 |" in (tmp_path / "v" / "visdial_rounds.md").read_text()

    got = mmdialog.run(module, datamodule(data), tmp_path / "m")
    # images: responses 0.5 (r0 hit, g0 tie), 1, 1, 0 -> 62.5 at 1 (the plain mean over the 5 elements is 60)
    assert got["val/mmdialog/mmdialog_image_response/recall@1"] == 62.5
    assert got["val/mmdialog/mmdialog_image_response/recall@5"] == 100.0
    # texts: "here is <colour>" against the context's colour: hits for 0, 1, 2; response 3 ranks red first
    assert got["val/mmdialog/mmdialog_text_response/recall@1"] == 75.0
    assert got["val/mmdialog/mmdialog_text_response/recall@5"] == 100.0
    assert "mmdialog_text_response" in (tmp_path / "m" / "retrieval_mmdialog.md").read_text()
    # per-query outputs: VisDial as pool retrieval (TREC + JSONL), MMDialog as candidate lists; a tie with the
    # element counts against it (the g0 row above), so `correct` is false there and a negative is `predicted`
    visdial_rows = (tmp_path / "v" / "per_query" / "visdial_d2i_r2.jsonl").read_text().splitlines()
    assert [json.loads(r)["hit"]["1"] for r in visdial_rows] == [False] * len(visdial_rows)
    assert (tmp_path / "v" / "per_query" / "visdial_d2i_r2.trec").stat().st_size > 0
    rows = [json.loads(r) for r in (tmp_path / "m" / "per_query" / "mmdialog_image_response.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and sum(r["correct"] for r in rows) == 3
    assert all((r["predicted"] == 0) == r["correct"] and r["positive"] == [0] for r in rows)


# -- a tiny FROMAGe against a plain computation ----------------------------------------------------------------
def _records(shard_set):
    recs = [decode_sample(raw) for shard in read_index(shard_set).shards for raw in iter_raw_samples(shard.path)]
    return sorted(recs, key=lambda r: r.key)


def _embed(module, proc, records, side):
    batch = FrozenLMCollator(proc, sides=(side,), pair_sides=())(records)[side]
    with torch.no_grad():
        encode = module.encode_query if side == "query" else module.encode_candidate
        return encode(batch).numpy()


def plain_hit(query, cands, positive, k):
    """Share (%) of queries whose positive column scores above all but at most k-1 other columns."""
    scores = query @ cands.T
    pos = scores[np.arange(len(query)), positive]
    return 100.0 * float(np.mean((scores > pos[:, None]).sum(1) < k))


def tiny_fromage(root: Path):
    torch.manual_seed(0)  # the same random model in every process
    return build_module(str(root / "vocab.txt"), image_space="learned").eval()


def test_tiny_fromage_matches_a_plain_computation(data, tmp_path):
    module = tiny_fromage(data)
    proc = word_level_frozen_lm_processor(str(data / "vocab.txt"), max_length=64)
    visdial, mmdialog = evaluators(data)
    got = visdial.run(module, datamodule(data), tmp_path / "v")
    bench = load_benchmark(data / "visdial")
    for spec in bench.evaluations:
        queries, pool = _records(spec.queries), _records(bench.pools[spec.pool])
        row = {r.meta["did"]: j for j, r in enumerate(pool)}
        qrels = read_qrels(spec.qrels)
        positive = np.array([row[next(iter(qrels[q.key]))] for q in queries])  # one positive each
        q, c = _embed(module, proc, queries, "query"), _embed(module, proc, pool, "cand")
        for k in (1, 5):  # with 3 dialogues hit@5 is 100 for any model; hit@1 is what this checks
            assert got[f"val/visdial/{spec.name}/hit@{k}"] == pytest.approx(plain_hit(q, c, positive, k)), (spec.name, k)

    got = mmdialog.run(module, datamodule(data), tmp_path / "m")
    bench = load_benchmark(data / "mmdialog")
    for spec in bench.evaluations:
        queries, pool = _records(spec.queries), _records(bench.pools[spec.pool])
        vectors = dict(zip([r.meta["did"] for r in pool], _embed(module, proc, pool, "cand")))
        q = _embed(module, proc, queries, "query")
        per_response: dict[str, list[float]] = {}
        for i, rec in enumerate(queries):
            cands = np.stack([vectors[d] for d in rec.meta["candidates"]])
            per_response.setdefault(rec.meta["response"], []).append(plain_hit(q[i : i + 1], cands, np.array([0]), 1))
        expected = float(np.mean([np.mean(v) for v in per_response.values()]))
        assert got[f"val/mmdialog/{spec.name}/recall@1"] == pytest.approx(expected), spec.name


# -- 1 vs 2 processes ----------------------------------------------------------------------------------------
def evaluate(rank: int, world_size: int, root: str) -> dict[str, float]:
    root = Path(root)
    module = tiny_fromage(root)
    visdial, mmdialog = evaluators(root)
    out = root / f"out-{world_size}"
    return {**visdial.run(module, datamodule(root), out / "v"), **mmdialog.run(module, datamodule(root), out / "m")}


def test_one_and_two_processes_give_identical_metrics(data):
    single = evaluate(0, 1, str(data))
    assert len(single) > 10
    two = run_distributed(evaluate, 2, str(data), timeout_s=120)
    assert two[0] == single and two[1] == single
