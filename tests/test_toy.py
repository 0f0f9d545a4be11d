"""The bundled toy dataset: determinism, split hygiene, evaluable queries, vocabulary, caching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unimm.data import toy
from unimm.data.benchmark import load_benchmark, read_qrels
from unimm.data.records import decode_sample
from unimm.data.shards import iter_raw_samples, read_index

SMALL = {"n_train_per_task": 20, "n_eval_queries": 15, "n_pool_images": 60}


def raw_samples(shard_set: str | Path) -> list[dict]:
    return [s for shard in read_index(shard_set).shards for s in iter_raw_samples(shard.path)]


def shard_sets(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("index.json"))


@pytest.fixture(scope="module")
def default_toy(tmp_path_factory) -> Path:
    return toy.build_toy(tmp_path_factory.mktemp("toy") / "toy")


@pytest.fixture(scope="module")
def samples(default_toy) -> dict[str, list[dict]]:
    """Raw samples of every shard set of the default build, read once: folder relative to the root -> samples."""
    return {str(p.relative_to(default_toy)): raw_samples(p) for p in shard_sets(default_toy)}


def metas_of(samples: list[dict]) -> list[dict]:
    return [json.loads(s["meta.json"]) for s in samples]


def test_default_size_has_three_tasks_with_different_modality_pairs(default_toy, samples):
    index = read_index(default_toy / "train")
    assert index.total == 3000 and len(index.shards) >= 2  # several shards, so that loader workers share them
    pairs = {}
    for sample in samples["train"]:
        sides = {
            side: {f.rpartition(".")[2] for f in sample if f.startswith(side + ".")}
            for side in ("query", "pos")
        }
        pair = tuple(
            "image,text" if exts == {"png", "txt"} else "image" if exts == {"png"} else "text"
            for exts in sides.values()
        )
        pairs.setdefault(json.loads(sample["meta.json"])["task"], set()).add(pair)
        assert sample["instruction.txt"].decode() == toy.INSTRUCTIONS[json.loads(sample["meta.json"])["task"]]
    assert pairs == {task: {modalities} for task, modalities in toy.TASKS.items()}
    info = json.loads((default_toy / "toy.json").read_text())
    assert info["counts"]["train_per_task"] == {"t2i": 1000, "i2t": 1000, "it2i": 1000}


def test_train_and_eval_instances_are_disjoint(samples):
    train_ids, eval_ids = (set(ids.tolist()) for ids in toy.split_instances(0))
    assert not train_ids & eval_ids and len(train_ids | eval_ids) == 1797
    assert 0.65 < len(train_ids) / 1797 < 0.75
    for m in metas_of(samples["train"]):  # it2i: the positive shows another drawing of the same digit
        assert len(set(m["instances"])) == (2 if m["task"] == "it2i" else 1)
    used_in_train = {i for m in metas_of(samples["train"]) for i in m["instances"]}
    used_in_eval = {
        i
        for name, s in samples.items()
        if name.startswith("eval/")
        for m in metas_of(s)
        for i in m.get("instances", [])
    }
    assert used_in_train <= train_ids and used_in_eval <= eval_ids
    assert len(used_in_eval) > 400  # the pool spreads over (nearly) all eval instances


def test_every_query_has_exactly_the_pool_positives_with_its_target_attributes(default_toy, samples):
    bench = load_benchmark(default_toy / "eval")
    assert [e.name for e in bench.evaluations] == ["toy_t2i", "toy_i2t", "toy_it2i"]
    for spec in bench.evaluations:
        pool = {m["did"]: m for m in metas_of(samples[f"eval/pools/{spec.pool}"])}
        qrels = read_qrels(spec.qrels)
        queries = metas_of(samples[f"eval/queries/{spec.name}"])
        assert len(queries) == 200 and spec.ks == (1, 5, 10) and spec.report_k == 5
        for q in queries:
            target = (q["digit"], q["colour"], q["size"])
            expected = {did for did, m in pool.items() if (m["digit"], m["colour"], m["size"]) == target}
            assert expected, f"{spec.name}: {q['qid']} has no positive in pool {spec.pool}"
            assert qrels[q["qid"]] == expected == set(q["pos_cand_list"])
    assert len(samples["eval/pools/toy_captions"]) == 120


def test_i2t_queries_are_new_renderings_not_pool_images(samples):
    pool_images = {s["cand.png"] for s in samples["eval/pools/toy_images"]}
    query_images = [s["query.png"] for s in samples["eval/queries/toy_i2t"]]
    assert not pool_images.intersection(query_images)


def test_vocab_covers_every_word(default_toy, samples):
    vocab = (default_toy / "vocab.txt").read_text().split()
    assert vocab == sorted(set(vocab)) and all(w == w.lower() for w in vocab)
    texts = [v.decode() for s in samples.values() for r in s for f, v in r.items() if f.endswith(".txt")]
    words = {w for text in texts for w in text.lower().split()}
    assert words == set(vocab)


def test_records_decode_to_the_described_images(samples):
    record = decode_sample(samples["train"][0])
    image = record.sides["pos"].image
    assert record.meta["task"] == "t2i" and image.size == (32, 32)
    r, g, b = (max(band.getdata()) for band in image.split())
    expected = toy.COLOURS[record.meta["colour"]]
    assert [c > 100 for c in (r, g, b)] == [c > 0 for c in expected]  # tinted with the captioned colour only


def test_same_seed_builds_identical_data_and_another_seed_differs(tmp_path):
    a, b, c = (
        toy.build_toy(tmp_path / name, seed=seed, **SMALL) for name, seed in (("a", 0), ("b", 0), ("c", 1))
    )
    sets_a = shard_sets(a)
    assert [p.relative_to(a) for p in sets_a] == [p.relative_to(b) for p in shard_sets(b)]
    for path in sets_a:
        other = b / path.relative_to(a)
        assert (path / "index.json").read_bytes() == (other / "index.json").read_bytes()
        assert raw_samples(path) == raw_samples(other)  # keys, captions, image bytes, metas
    assert (a / "eval/benchmark.json").read_bytes() == (b / "eval/benchmark.json").read_bytes()
    assert (a / "eval/qrels/toy_it2i.txt").read_bytes() == (b / "eval/qrels/toy_it2i.txt").read_bytes()
    assert raw_samples(a / "train") != raw_samples(c / "train")
    assert (a / "eval/qrels/toy_t2i.txt").read_bytes() != (c / "eval/qrels/toy_t2i.txt").read_bytes()


def test_ensure_toy_builds_only_when_params_change(tmp_path):
    root = tmp_path / "toy"
    assert toy.ensure_toy(root, **SMALL) == root
    stamp = (root / "toy.json").stat().st_mtime_ns
    toy.ensure_toy(root, **SMALL)
    assert (root / "toy.json").stat().st_mtime_ns == stamp
    toy.ensure_toy(root, **{**SMALL, "seed": 3})
    assert json.loads((root / "toy.json").read_text())["params"]["seed"] == 3
    with pytest.raises(TypeError, match="n_train"):
        toy.ensure_toy(root, n_train=5)


def test_a_failed_build_leaves_the_previous_dataset_and_no_partial_folder(tmp_path, monkeypatch):
    root = toy.build_toy(tmp_path / "toy", **SMALL)
    before = (root / "toy.json").read_bytes()

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(toy, "_build_eval", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        toy.build_toy(root, seed=5, **SMALL)
    assert (root / "toy.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]
