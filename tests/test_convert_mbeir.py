"""M-BEIR converter and benchmark folders, on a tiny fixture in the official M-BEIR layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_mbeir import MBEIRFixture, write_mbeir_fixture

from unimm.data.benchmark import load_benchmark, read_qrels
from unimm.data.convert import mbeir
from unimm.data.records import IMAGE_EXTS, Item, decode_sample
from unimm.data.shards import iter_raw_samples, read_index

REPO = Path(__file__).resolve().parents[1]
T0, T3, T7 = "mbeir_mscoco_task0_test", "mbeir_mscoco_task3_test", "mbeir_cirr_task7_test"


@pytest.fixture
def fx(tmp_path) -> MBEIRFixture:
    return write_mbeir_fixture(tmp_path / "M-BEIR")


def read_back(shard_set: Path) -> list[tuple[dict, object]]:
    """(raw sample, decoded Record) for every sample, in order."""
    return [
        (raw, decode_sample(raw, shard.path))
        for shard in read_index(shard_set).shards
        for raw in iter_raw_samples(shard.path)
    ]


def check_side(
    fx: MBEIRFixture, raw: dict, item: Item, side: str, text: str | None, img_path: str | None
) -> None:
    """The side holds exactly the source text and the source image file's bytes (under its own extension)."""
    assert item.text == text
    image_fields = {f for f in raw if f.rpartition(".")[0] == side and f.rpartition(".")[2] in IMAGE_EXTS}
    if img_path is None:
        assert not image_fields and item.image is None
    else:
        assert image_fields == {f"{side}.{img_path.rpartition('.')[2]}"}
        assert raw[image_fields.pop()] == fx.image_bytes(img_path)
        assert item.image.size == (6, 4)


def append_lines(path: Path, *lines: str) -> None:
    with open(path, "a") as f:
        f.writelines(line + "\n" for line in lines)


def test_train_records_match_the_source(fx, tmp_path):
    out = tmp_path / "train"
    report = mbeir.convert_train(fx.train_queries, fx.pool, fx.root, out, shard_size=2)
    got = read_back(out)
    assert len(read_index(out).shards) == 3
    assert [rec.key for _, rec in got] == ["mbeir_9_1", "mbeir_9_2", "mbeir_9_3", "mbeir_9_4", "mbeir_8_5"]
    for raw, rec in got:
        q = fx.queries[rec.meta["qid"]]
        pos = fx.candidates[q["pos_cand_list"][0]]
        check_side(fx, raw, rec.sides["query"], "query", q["query_txt"], q["query_img_path"])
        # every positive of the query is written, in pos_cand_list order: pos, pos.1, ...
        names = ["pos"] + [f"pos.{i}" for i in range(1, len(q["pos_cand_list"]))]
        assert sorted(s for s in rec.sides if s.startswith("pos")) == names
        for name, did in zip(names, q["pos_cand_list"]):
            check_side(fx, raw, rec.sides[name], name, fx.candidates[did]["txt"], fx.candidates[did]["img_path"])
        task_id = fx.task_ids[q["qid"]]
        assert rec.meta == {
            "qid": q["qid"],
            "dataset": mbeir.DATASETS[int(q["qid"][0])],
            "dataset_id": int(q["qid"][0]),
            "task": {0: "t2i", 3: "i2t", 7: "it2i"}[task_id],
            "task_id": task_id,
            "query_modality": q["query_modality"],
            "pos_modality": pos["modality"],
            "pos_did": pos["did"],
            "pos_dids": q["pos_cand_list"],
            "pos_cand_list": q["pos_cand_list"],
            "neg_cand_list": q["neg_cand_list"],
        }
    assert report["queries"]["problems"] == {} and report["queries"]["kept"] == 5
    assert [len(rec.meta["pos_dids"]) for _, rec in got] == [1, 2, 1, 1, 1]  # 9:2 has two positives
    assert json.loads((out / "convert_report.json").read_text())["train"]["pool"]["kept"] == len(
        fx.candidates
    )


def test_eval_benchmark_matches_the_source_and_shares_the_pool(fx, tmp_path):
    bench = tmp_path / "bench"
    first = mbeir.convert_eval("mscoco_task0", fx.test_queries[T0], fx.pool, fx.qrels[T0], fx.root, bench)
    pool_shard = bench / "pools/mbeir_union_test_cand_pool/shard-000000.tar"
    stamp = pool_shard.stat().st_mtime_ns
    second = mbeir.convert_eval(
        "cirr_task7", fx.test_queries[T7], fx.pool, fx.qrels[T7], fx.root, bench, ks=(1, 5)
    )
    assert not first["pool"]["reused"] and second["pool"]["reused"] and pool_shard.stat().st_mtime_ns == stamp

    spec = load_benchmark(bench)
    assert list(spec.pools) == ["mbeir_union_test_cand_pool"]
    t0, t7 = spec.evaluations
    assert (t0.name, t0.dataset, t0.task, t0.query_modality, t0.cand_modality, t0.ks, t0.report_k) == (
        "mscoco_task0",
        "MSCOCO",
        "t2i",
        "text",
        "image",
        (1, 5, 10),
        5,
    )
    assert (t7.name, t7.dataset, t7.task, t7.query_modality, t7.cand_modality, t7.ks) == (
        "cirr_task7",
        "CIRR",
        "it2i",
        "image,text",
        "image",
        (1, 5),
    )
    assert Path(t7.qrels).read_bytes() == fx.qrels[T7].read_bytes()
    assert read_qrels(t0.qrels) == {"9:1": {"9:1001"}, "9:2": {"9:1003", "9:1002"}}

    pool = read_back(Path(t0.pool_path))
    assert sorted(rec.meta["did"] for _, rec in pool) == sorted(fx.candidates)
    for raw, rec in pool:
        c = fx.candidates[rec.meta["did"]]
        check_side(fx, raw, rec.sides["cand"], "cand", c["txt"], c["img_path"])
        assert (
            rec.meta["modality"] == c["modality"] and rec.meta["dataset"] == mbeir.DATASETS[int(c["did"][0])]
        )
        assert rec.meta["img_path"] == c["img_path"]
    for spec_ in (t0, t7):
        for raw, rec in read_back(Path(spec_.queries)):
            q = fx.queries[rec.meta["qid"]]
            check_side(fx, raw, rec.sides["query"], "query", q["query_txt"], q["query_img_path"])
            assert rec.meta["pos_cand_list"] == q["pos_cand_list"] and rec.meta["task"] == spec_.task
            assert rec.meta["query_img_path"] == q["query_img_path"]
            assert (
                rec.meta["query_modality"] == q["query_modality"]
                and rec.meta["task_id"] == fx.task_ids[q["qid"]]
            )
    assert set(json.loads((bench / "convert_report.json").read_text())) == {"mscoco_task0", "cirr_task7"}


def test_missing_image_is_counted_named_and_the_rest_survive(fx, tmp_path):
    missing = fx.root / fx.queries["9:3"]["query_img_path"]
    missing.unlink()
    report = mbeir.convert_train(fx.train_queries, fx.pool, fx.root, tmp_path / "train")
    assert report["queries"]["problems"] == {"missing_image": 1}
    assert report["queries"]["kept"] == 4 and report["queries"]["skipped"] == 1
    [example] = report["queries"]["examples"]["missing_image"]
    assert str(fx.train_queries) in example and "qid=9:3" in example and str(missing) in example
    assert [r.key for _, r in read_back(tmp_path / "train")] == [
        "mbeir_9_1",
        "mbeir_9_2",
        "mbeir_9_4",
        "mbeir_8_5",
    ]
    on_disk = json.loads((tmp_path / "train/convert_report.json").read_text())
    assert on_disk["train"]["queries"]["examples"]["missing_image"] == [example]


def test_missing_candidate_image_in_eval_keeps_the_query_and_reports_both(fx, tmp_path):
    (fx.root / fx.candidates["9:1001"]["img_path"]).unlink()
    report = mbeir.convert_eval(
        "mscoco_task0", fx.test_queries[T0], fx.pool, fx.qrels[T0], fx.root, tmp_path / "b"
    )
    assert (
        report["pool"]["problems"] == {"missing_image": 1}
        and "did=9:1001" in report["pool"]["examples"]["missing_image"][0]
    )
    assert report["queries"]["problems"] == {"qrel_not_in_pool": 1} and report["queries"]["kept"] == 2


def test_strict_raises_naming_the_file_and_the_qid(fx, tmp_path):
    missing = fx.root / fx.queries["9:3"]["query_img_path"]
    missing.unlink()
    with pytest.raises(mbeir.ConversionError, match="missing_image") as err:
        mbeir.convert_train(fx.train_queries, fx.pool, fx.root, tmp_path / "train", strict=True)
    assert (
        str(fx.train_queries) in str(err.value)
        and "qid=9:3" in str(err.value)
        and str(missing) in str(err.value)
    )
    assert not (tmp_path / "train").exists()  # no half-written shard set is left behind


def test_malformed_lines_and_absent_positives_are_counted(fx, tmp_path):
    q = fx.queries["9:1"]
    append_lines(
        fx.train_queries,
        '{"qid": "9:6", "query_txt": "broken',  # line 6: truncated JSON
        "[1, 2]",  # line 7: valid JSON, not a query object
        json.dumps(
            {**q, "qid": "9:7", "pos_cand_list": ["9:404", "9:1002"]}
        ),  # first positive absent: use the next
        json.dumps({**q, "qid": "9:8", "pos_cand_list": ["9:405"]}),  # no positive in the pool: skipped
    )
    report = mbeir.convert_train(fx.train_queries, fx.pool, fx.root, tmp_path / "train")["queries"]
    assert report["problems"] == {"bad_json": 2, "pos_not_in_pool": 2, "no_usable_positive": 1}
    assert report["lines"] == 9 and report["kept"] == 6 and report["skipped"] == 3
    assert report["examples"]["bad_json"][0].startswith(f"{fx.train_queries}:6")
    assert f"{fx.train_queries}:8 qid=9:7" in report["examples"]["pos_not_in_pool"][0]
    [rec] = [r for _, r in read_back(tmp_path / "train") if r.meta["qid"] == "9:7"]
    assert rec.meta["pos_did"] == "9:1002" and rec.sides["pos"].image is not None
    assert rec.meta["pos_dids"] == ["9:1002"] and "pos.1" not in rec.sides


def test_repeated_qids_of_upsampled_files_get_distinct_keys(fx, tmp_path):
    append_lines(fx.train_queries, json.dumps(fx.queries["9:1"]))
    report = mbeir.convert_train(fx.train_queries, fx.pool, fx.root, tmp_path / "train")["queries"]
    assert report["problems"] == {} and report["repeated_qids"] == 1
    assert [r.key for _, r in read_back(tmp_path / "train")][-1] == "mbeir_9_1_dup1"


def test_cli_eval_writes_a_loadable_benchmark(fx, tmp_path):
    bench = tmp_path / "bench"
    cmd = [
        sys.executable,
        "-m",
        "unimm.data.convert",
        "mbeir",
        "eval",
        "--name",
        "mscoco_task3",
        "--queries",
        str(fx.test_queries[T3]),
        "--pool",
        str(fx.pool),
        "--qrels",
        str(fx.qrels[T3]),
        "--images",
        str(fx.root),
        "--out",
        str(bench),
        "--pool-name",
        "coco_pool",
        "--ks",
        "1,10",
        "--report-k",
        "10",
    ]
    done = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr
    assert "convert_report.json" in done.stdout
    spec = load_benchmark(bench).evaluation("mscoco_task3")
    assert (spec.pool, spec.task, spec.cand_modality, spec.ks, spec.report_k) == (
        "coco_pool",
        "i2t",
        "text",
        (1, 10),
        10,
    )
    assert read_index(spec.queries).total == 2


def test_load_benchmark_names_what_is_wrong(fx, tmp_path):
    bench = tmp_path / "bench"
    with pytest.raises(FileNotFoundError, match="benchmark.json"):
        load_benchmark(bench)
    mbeir.convert_eval("mscoco_task0", fx.test_queries[T0], fx.pool, fx.qrels[T0], fx.root, bench)
    path = bench / "benchmark.json"
    good = json.loads(path.read_text())
    path.write_text(json.dumps({**good, "evaluations": [{**good["evaluations"][0], "pool": "nope"}]}))
    with pytest.raises(ValueError, match="'mscoco_task0' uses pool 'nope'"):
        load_benchmark(bench)
    path.write_text(json.dumps(good))
    (bench / "queries/mscoco_task0/index.json").unlink()
    with pytest.raises(FileNotFoundError, match="queries/mscoco_task0"):
        load_benchmark(bench)


def test_read_qrels_keeps_only_relevant_lines_and_rejects_bad_ones(tmp_path):
    path = tmp_path / "qrels.txt"
    path.write_text("9:1 0 9:11 1 0\n9:1 0 9:12 0 0\n9:2 0 9:13 0 0\n\n9:3 0 9:14 2 3\n")
    assert read_qrels(path) == {"9:1": {"9:11"}, "9:3": {"9:14"}}
    path.write_text("9:1 0 9:11 1 0\n9:1 9:11\n")
    with pytest.raises(ValueError, match="qrels.txt:2"):
        read_qrels(path)


def test_a_reused_pool_reports_what_its_shards_hold(fx, tmp_path):
    """A second evaluation on a converted pool counts the candidates written, not the pool file's lines: a
    candidate whose image was missing at conversion is not in the shards, so its qrels are not in the pool."""
    (fx.root / fx.candidates["9:1001"]["img_path"]).unlink()
    bench = tmp_path / "bench"
    first = mbeir.convert_eval("cirr_task7", fx.test_queries[T7], fx.pool, fx.qrels[T7], fx.root, bench)
    second = mbeir.convert_eval("mscoco_task0", fx.test_queries[T0], fx.pool, fx.qrels[T0], fx.root, bench)
    pool_path = bench / "pools/mbeir_union_test_cand_pool"
    held = [rec.meta["did"] for _, rec in read_back(pool_path)]
    assert len(held) == read_index(pool_path).total == len(fx.candidates) - 1 and "9:1001" not in held
    assert not first["pool"]["reused"] and second["pool"]["reused"]
    assert first["pool"]["kept"] == second["pool"]["kept"] == len(held)
    # the reused pool's report repeats what was skipped when it was written, and says by which report
    assert (second["pool"]["lines"], second["pool"]["skipped"], second["pool"]["problems"]) == (
        len(fx.candidates), 1, {"missing_image": 1})
    assert second["pool"]["reported_when_written_by"] == "cirr_task7"
    # the same queries against a freshly written pool: what a reused pool must report too
    fresh = mbeir.convert_eval("mscoco_task0", fx.test_queries[T0], fx.pool, fx.qrels[T0], fx.root, tmp_path / "b2")
    assert fresh["queries"]["problems"] == second["queries"]["problems"] == {"qrel_not_in_pool": 1}
    assert "did=9:1001" in second["queries"]["examples"]["qrel_not_in_pool"][0]


def test_a_damaged_but_whole_jpeg_is_skipped_by_decode_and_counted_by_the_loader_with_structure(fx, tmp_path):
    """A JPEG whose bytes are damaged but whose markers are intact: ``decode`` skips it at conversion;
    ``structure`` (the default) keeps it, and the data loader counts it as bad_image of its shard."""
    from collections import Counter

    from test_image_files import flipped_huffman_table, pil_decodes
    from torch.utils.data import DataLoader

    from unimm.data.stream import ShardStream, Source

    path = fx.root / fx.candidates["9:1003"]["img_path"]
    path.write_bytes(flipped_huffman_table(path.read_bytes()))
    assert not pil_decodes(path.read_bytes())
    pool = "pools/mbeir_union_test_cand_pool"
    args = ("mscoco_task0", fx.test_queries[T0], fx.pool, fx.qrels[T0], fx.root)

    decoded = mbeir.convert_eval(*args, tmp_path / "decode", verify_images="decode")
    assert decoded["verify_images"] == "decode" and decoded["pool"]["problems"] == {"bad_image": 1}
    [example] = decoded["pool"]["examples"]["bad_image"]
    assert "did=9:1003" in example and str(path) in example
    assert "9:1003" not in [rec.meta["did"] for _, rec in read_back(tmp_path / "decode" / pool)]

    kept = mbeir.convert_eval(*args, tmp_path / "structure")
    assert kept["verify_images"] == "structure" and kept["pool"]["problems"] == {}
    index = read_index(tmp_path / "structure" / pool)
    raws = {json.loads(raw["meta.json"])["did"]: raw for s in index.shards for raw in iter_raw_samples(s.path)}
    assert raws["9:1003"]["cand.jpg"] == path.read_bytes()  # stored as it is

    stream = ShardStream([Source(index)], batch_size=2, collate=lambda records: {"keys": [r.key for r in records]},
                         train=False, required_sides=("cand",))
    stream.configure(0, 1, 0)
    keys, skipped = [], Counter()
    for batch in DataLoader(stream, batch_size=None, num_workers=0, collate_fn=lambda b: b):
        keys += batch["keys"]
        skipped.update(batch["stats"].skipped)
    assert sorted(keys) == sorted(mbeir.sample_key(did) for did in fx.candidates if did != "9:1003")
    [shard] = [s.path for s in index.shards if any(m.startswith("mbeir_9_1003.") for m in _members(s.path))]
    assert +skipped == Counter({("bad_image", shard): 1})


def _members(shard: str) -> list[str]:
    import tarfile

    with tarfile.open(shard) as tar:
        return tar.getnames()


def test_the_verify_images_flag_reaches_the_report_and_a_bad_level_is_refused(fx, tmp_path, capsys):
    from unimm.data.convert.__main__ import main as convert_main

    common = ["--queries", str(fx.train_queries), "--pool", str(fx.pool), "--images", str(fx.root)]
    convert_main(["mbeir", "train", *common, "--out", str(tmp_path / "a"), "--workers", "1"])
    convert_main(["mbeir", "train", *common, "--out", str(tmp_path / "b"), "--workers", "1",
                  "--verify-images", "decode"])
    for out, level in (("a", "structure"), ("b", "decode")):
        assert json.loads((tmp_path / out / "convert_report.json").read_text())["train"]["verify_images"] == level
        assert f"verify_images={level}" in read_index(tmp_path / out).source
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        convert_main(["mbeir", "train", *common, "--out", str(tmp_path / "c"), "--verify-images", "fast"])
    assert exit_.value.code == 2
    assert "invalid choice: 'fast'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="'fast'.*structure, decode"):
        mbeir.convert_train(fx.train_queries, fx.pool, fx.root, tmp_path / "c", verify_images="fast")
    assert not (tmp_path / "c").exists() and not (tmp_path / ".c.partial").exists()
