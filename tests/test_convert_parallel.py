"""Parallel, resumable conversion (unimm.data.convert.parallel) and `convert mbeir all` on the official layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fixtures_mbeir import CANDIDATES, MBEIRFixture, write_mbeir_fixture

from unimm.data.benchmark import load_benchmark
from unimm.data.convert import mbeir
from unimm.data.convert.__main__ import main as convert_main
from unimm.data.shards import iter_raw_samples, read_index

T0, T3, T7 = "mbeir_mscoco_task0_test", "mbeir_mscoco_task3_test", "mbeir_cirr_task7_test"


@pytest.fixture
def fx(tmp_path) -> MBEIRFixture:
    return write_mbeir_fixture(tmp_path / "M-BEIR")


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes), except the per-run reports."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != mbeir.REPORT_FILE}


def grow_train_queries(fx: MBEIRFixture, copies: int) -> None:
    """Repeat the training queries (as UniIR's upsampled file does) so that there are several shards."""
    lines = fx.train_queries.read_text().splitlines(keepends=True)
    fx.train_queries.write_text("".join(lines * copies))


def test_one_and_two_workers_write_the_same_bytes(fx, tmp_path):
    grow_train_queries(fx, 3)  # 15 queries -> 8 shards of 2
    reports = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        reports[workers] = mbeir.convert_train(fx.train_queries, fx.pool, fx.root, out / "train", shard_size=2,
                                               workers=workers)
        for name in (T0, T3):
            mbeir.convert_eval(name, fx.test_queries[name], fx.pool, fx.qrels[name], fx.root, out / "eval",
                               shard_size=3, workers=workers)
    one, two = tree(tmp_path / "w1"), tree(tmp_path / "w2")
    assert sorted(one) == sorted(two) and one == two
    assert len(read_index(tmp_path / "w1" / "train").shards) == 8
    assert "train/index.json" in one and "eval/pools/mbeir_union_test_cand_pool/index.json" in one
    # the accounting is the same too, and no partial folder is left behind
    for key in ("kept", "skipped", "problems", "examples", "repeated_qids"):
        assert reports[1]["queries"][key] == reports[2]["queries"][key]
    assert reports[1]["queries"]["kept"] == 15 and reports[1]["queries"]["repeated_qids"] == 10
    assert not list(tmp_path.rglob("*.partial"))


def test_the_shards_depend_on_the_input_not_on_the_time_of_the_run(fx, tmp_path, monkeypatch):
    mbeir.convert_train(fx.train_queries, fx.pool, fx.root, tmp_path / "a", shard_size=2, workers=1)
    import time as time_module

    monkeypatch.setattr(time_module, "time", lambda: 4_000_000_000.0)  # a run decades later
    mbeir.convert_train(fx.train_queries, fx.pool, fx.root, tmp_path / "b", shard_size=2, workers=1)
    assert tree(tmp_path / "a") == tree(tmp_path / "b")


def test_an_interrupted_conversion_resumes_without_redoing_finished_shards(fx, tmp_path):
    grow_train_queries(fx, 3)
    reference = tmp_path / "reference"
    mbeir.convert_train(fx.train_queries, fx.pool, fx.root, reference, shard_size=2, workers=1)
    # the image of query 9:3 (line 3, the second shard) is unreadable for a while: strict mode stops there,
    # as a crash would, after the first shard is finished
    image = fx.root / fx.queries["9:3"]["query_img_path"]
    saved = image.read_bytes()
    image.write_bytes(saved[:20])
    out = tmp_path / "train"
    with pytest.raises(mbeir.ConversionError, match="bad_image.*qid=9:3"):
        mbeir.convert_train(fx.train_queries, fx.pool, fx.root, out, shard_size=2, workers=1, strict=True)
    partial = tmp_path / ".train.partial"
    assert sorted(p.name for p in partial.glob("shard-*.tar")) == ["shard-000000.tar"] and not out.exists()
    finished = (partial / "shard-000000.tar").stat().st_mtime_ns
    image.write_bytes(saved)
    report = mbeir.convert_train(fx.train_queries, fx.pool, fx.root, out, shard_size=2, workers=1)
    assert report["resumed_shards"] == 1 and report["queries"]["kept"] == 15
    assert (out / "shard-000000.tar").stat().st_mtime_ns == finished  # not rewritten
    assert tree(out) == tree(reference)


def test_resume_keeps_finished_shards_and_redoes_cut_or_missing_ones(fx, tmp_path):
    grow_train_queries(fx, 3)
    out = tmp_path / "train"
    first = mbeir.convert_train(fx.train_queries, fx.pool, fx.root, out, shard_size=2, workers=2)
    reference = tree(out)
    # simulate a run killed at various points: its folder is the partial one, without index.json
    partial = tmp_path / ".train.partial"
    shutil.copytree(out, partial)
    (partial / "index.json").unlink()
    state = {"source": read_index(out).source, "converter": "unimm.data.convert.mbeir train", "shard_size": 2,
             "mtime": int(fx.train_queries.stat().st_mtime), "format_version": 1}
    (partial / "convert.json").write_text(json.dumps(state))
    counts = {Path(s.path).name: s.count for s in read_index(out).shards}
    for name, count in counts.items():
        (partial / f"{name}.done.json").write_text(json.dumps({"count": count, "items": count, "accounting": {
            "kept": count, "skipped": 0, "problems": {}, "examples": {}}}))
    shutil.rmtree(out)
    cut = partial / "shard-000001.tar"
    cut.write_bytes(cut.read_bytes()[:700])  # renamed, then cut short (a lost page cache)
    (partial / "shard-000002.tar").unlink()  # its done file remains: not finished
    (partial / "shard-000003.tar.done.json").unlink()  # written, killed before its done file
    (partial / "shard-000004.tar.tmp-123").write_bytes(b"half")  # a killed writer's temporary file
    second = mbeir.convert_train(fx.train_queries, fx.pool, fx.root, out, shard_size=2, workers=2)
    assert second["resumed_shards"] == len(counts) - 3
    assert tree(out) == reference
    assert second["queries"]["kept"] == first["queries"]["kept"] == 15
    assert sum(1 for s in read_index(out).shards for _ in iter_raw_samples(s.path)) == 15


def test_a_partial_folder_written_at_another_image_verification_level_is_started_over(fx, tmp_path):
    grow_train_queries(fx, 3)
    image = fx.root / fx.queries["9:3"]["query_img_path"]
    saved = image.read_bytes()
    image.write_bytes(saved[:20])  # the second shard fails in strict mode: the first one is finished
    out = tmp_path / "train"
    with pytest.raises(mbeir.ConversionError, match="bad_image.*qid=9:3"):
        mbeir.convert_train(fx.train_queries, fx.pool, fx.root, out, shard_size=2, workers=1, strict=True)
    assert (tmp_path / ".train.partial" / "shard-000000.tar").exists()
    image.write_bytes(saved)
    report = mbeir.convert_train(fx.train_queries, fx.pool, fx.root, out, shard_size=2, workers=1,
                                 verify_images="decode")
    assert report["resumed_shards"] == 0 and report["queries"]["kept"] == 15 and report["verify_images"] == "decode"


def test_a_partial_folder_of_another_input_is_started_over(fx, tmp_path):
    partial = tmp_path / ".train.partial"
    partial.mkdir()
    (partial / "convert.json").write_text(json.dumps({"source": "something else"}))
    (partial / "shard-000000.tar").write_bytes(b"not this input's")
    (partial / "shard-000000.tar.done.json").write_text(json.dumps({"count": 1, "items": 2, "accounting": {}}))
    report = mbeir.convert_train(fx.train_queries, fx.pool, fx.root, tmp_path / "train", shard_size=2, workers=1)
    assert report["resumed_shards"] == 0 and report["queries"]["kept"] == 5


def write_release(fx: MBEIRFixture) -> Path:
    """The fixture's queries, pools and qrels under the official M-BEIR release names of all 16 evaluations
    and of the training set (each evaluation reuses the fixture's three query files in turn)."""
    root = fx.root
    sources = [(fx.test_queries[n].read_text(), fx.qrels[n].read_text()) for n in (T0, T3, T7)]
    pool_text = fx.pool.read_text()
    for i, (name, pool, _, _) in enumerate(mbeir.LOCAL_EVALUATIONS):
        queries, pool_file, qrels = (root / f for f in mbeir.release_files(name, pool))
        for path in (queries, pool_file, qrels):
            path.parent.mkdir(parents=True, exist_ok=True)
        queries.write_text(sources[i % 3][0])
        qrels.write_text(sources[i % 3][1])
        pool_file.write_text(pool_text)
    (root / mbeir.TRAIN_QUERIES).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(fx.train_queries, root / mbeir.TRAIN_QUERIES)
    shutil.copyfile(fx.pool, root / mbeir.TRAIN_POOL)
    (root / mbeir.INSTRUCTIONS).parent.mkdir(parents=True, exist_ok=True)
    (root / mbeir.INSTRUCTIONS).write_text("dataset_id\tquery_modality\tcand_modality\tprompt_1\n")
    return root


def test_mbeir_all_prepares_the_whole_benchmark_in_one_command(fx, tmp_path, capsys):
    root = write_release(fx)
    out = tmp_path / "data" / "mbeir"
    convert_main(["mbeir", "all", "--root", str(root), "--out", str(out), "--workers", "1", "--shard-size", "4"])
    bench = load_benchmark(out / "eval_local")
    assert [e.name for e in bench.evaluations] == [e[0] for e in mbeir.LOCAL_EVALUATIONS]
    assert len(bench.pools) == 16 and "mbeir_mscoco_task0_test_cand_pool" in bench.pools
    by_name = {e.name: e for e in bench.evaluations}
    for name in ("fashion200k_task0", "fashion200k_task3", "fashioniq_task7"):
        assert by_name[name].ks == (10, 20, 50) and by_name[name].report_k == 10
    assert by_name["mscoco_task0"].ks == (1, 5, 10) and by_name["mscoco_task0"].report_k == 5
    assert by_name["mscoco_task0"].pool == "mbeir_mscoco_task0_test_cand_pool"
    assert by_name["visualnews_task0"].pool == "mbeir_visualnews_task0_cand_pool"
    assert read_index(bench.pools["mbeir_cirr_task7_cand_pool"]).total == len(CANDIDATES)
    assert read_index(out / "train" / "union_up").total == 5
    assert (out / "instructions" / "query_instructions.tsv").read_text().startswith("dataset_id")
    # the same bytes as the one-at-a-time commands it replaces
    single = tmp_path / "single"
    name, pool, ks, report_k = mbeir.LOCAL_EVALUATIONS[1]
    queries, pool_file, qrels = (root / f for f in mbeir.release_files(name, pool))
    mbeir.convert_eval(name, queries, pool_file, qrels, root, single, ks=ks, report_k=report_k, shard_size=4,
                       workers=2)
    assert tree(single / "queries" / name) == tree(out / "eval_local" / "queries" / name)
    assert tree(single / "pools") == {k: v for k, v in tree(out / "eval_local" / "pools").items()
                                      if k.startswith(pool_file.stem + "/")}
    # run again: every part is kept
    capsys.readouterr()
    reports = mbeir.convert_all(root, out, workers=1, shard_size=4)
    assert set(reports.values()) == {"already converted"} and len(reports) == 17
    # at the other image verification level nothing is "already converted": it decides which images are kept
    reports = mbeir.convert_all(root, out, only=["train", "mscoco_task0"], workers=1, shard_size=4,
                                verify_images="decode")
    assert [(r["mode"], r["verify_images"]) for r in reports.values()] == [("train", "decode"), ("eval", "decode")]
    assert not reports["mscoco_task0"]["pool"]["reused"]
    assert set(mbeir.convert_all(root, out, only=["train", "mscoco_task0"], workers=1, shard_size=4,
                                 verify_images="decode").values()) == {"already converted"}


def test_mbeir_all_names_missing_release_files_before_writing(fx, tmp_path, capsys):
    root = write_release(fx)
    (root / "qrels/test/mbeir_oven_task8_test_qrels.txt").unlink()
    with pytest.raises(SystemExit):
        convert_main(["mbeir", "all", "--root", str(root), "--out", str(tmp_path / "out")])
    assert "mbeir_oven_task8_test_qrels.txt" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="valid: \\['train', 'visualnews_task0'"):
        mbeir.convert_all(root, tmp_path / "out", only=["mscoco"])
    reports = mbeir.convert_all(root, tmp_path / "out", only=["cirr_task7"], workers=1)
    assert list(reports) == ["cirr_task7"]


def _parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_mmeb_all_prepares_eval_train_and_vqa_in_one_command(tmp_path, capsys):
    from PIL import Image

    from unimm.data.convert import mmeb

    root = tmp_path / "hf"
    for images in (mmeb.EVAL_IMAGES, mmeb.TRAIN_IMAGES):
        (root / images).mkdir(parents=True)
        Image.new("RGB", (8, 8), (200, 10, 10)).save(root / images / "a.jpg")
    for name in ("ImageNet-1K", "MSCOCO_t2i"):
        _parquet(root / mmeb.EVAL_DIR / name / "test-00000-of-00001.parquet", [
            {"qry_text": "<|image_1|> what is it", "qry_img_path": "a.jpg", "tgt_text": ["apple", "boat"],
             "tgt_img_path": ["", ""]}])
    for name in sorted(mmeb.IND):
        _parquet(root / mmeb.TRAIN_DIR / name / "train.parquet", [
            {"qry": f"<|image_1|> {name} {i}", "qry_image_path": "a.jpg", "pos_text": f"answer {i}",
             "pos_image_path": ""} for i in range(3)])
    out = tmp_path / "data"
    convert_main(["mmeb", "all", "--root", str(root), "--out", str(out), "--per-dataset", "2",
                  "--verify-images", "decode"])
    for part in ("mmeb_train", "mmeb_vqa"):
        report = json.loads((out / part / "convert_report.json").read_text())
        assert report["verify_images"] == "decode" and "verify_images=decode" in read_index(out / part).source
    eval_report = json.loads((out / "mmeb" / "convert_report.json").read_text())
    assert {r["verify_images"] for r in eval_report.values()} == {"decode"}
    bench = load_benchmark(out / "mmeb")
    assert sorted(e.name for e in bench.evaluations) == ["ImageNet-1K", "MSCOCO_t2i"]  # not eval_images
    assert read_index(out / "mmeb_train").total == 2 * len(mmeb.IND)  # --per-dataset rows of each IND set
    assert read_index(out / "mmeb_vqa").total == 3 * len(mmeb.VQA)  # every row of the six VQA sets
    shutil.rmtree(root / mmeb.TRAIN_DIR / "ChartQA")
    with pytest.raises(SystemExit):
        convert_main(["mmeb", "all", "--root", str(root), "--out", str(tmp_path / "again")])
    assert "MMEB-train/ChartQA" in capsys.readouterr().err and not (tmp_path / "again").exists()


def test_the_fast_tar_writer_writes_webdataset_s_bytes(tmp_path):
    import webdataset as wds

    from unimm.data.convert.parallel import TarWriter

    samples = [{"__key__": "mbeir_9_1", "meta.json": b'{"did": "9:1"}', "cand.jpg": b"\xff\xd8" * 700,
                "cand.txt": "caf\u00e9"},
               {"__key__": "k" * 120, "query.txt": b"a member name longer than 100 bytes: pax header"},
               {"__key__": "\u00fcml\u00e4ut", "pos.txt": b""}, {"__key__": "e", "pos.png": bytes(10240)}]
    ours, theirs = TarWriter(str(tmp_path / "ours.tar"), mtime=1_700_000_000), wds.TarWriter(
        str(tmp_path / "theirs.tar"), mtime=1_700_000_000)
    for sample in samples:
        ours.write(sample)
        theirs.write(sample)
    ours.close()
    theirs.close()
    assert (tmp_path / "ours.tar").read_bytes() == (tmp_path / "theirs.tar").read_bytes()
    assert [s["__key__"] for s in iter_raw_samples(str(tmp_path / "ours.tar"))] == [s["__key__"] for s in samples]


def test_a_killed_conversion_resumes_from_its_finished_shards(fx, tmp_path):
    """SIGKILL the command line mid-way (workers and all), run it again: the finished shards are kept and the
    result is the same bytes as an uninterrupted conversion."""
    import os
    import signal
    import subprocess
    import sys
    import time

    grow_train_queries(fx, 40)  # 200 queries, one shard each
    reference = tmp_path / "reference"
    mbeir.convert_train(fx.train_queries, fx.pool, fx.root, reference, shard_size=1, workers=1)
    out, partial = tmp_path / "train", tmp_path / ".train.partial"
    command = [sys.executable, "-m", "unimm.data.convert", "mbeir", "train", "--queries", str(fx.train_queries),
               "--pool", str(fx.pool), "--images", str(fx.root), "--out", str(out), "--shard-size", "1",
               "--workers", "2"]
    process = subprocess.Popen(command, env={**os.environ, "UNIMM_PROGRESS": "0"}, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(list(partial.glob("*.done.json"))) < 5 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)  # the command and its workers, as a lost node would
    process.wait()
    finished = len(list(partial.glob("*.done.json")))
    # 200 one-record shards against a kill after 5: a finished conversion means the test no longer tests resume
    assert not out.exists(), "the conversion finished before it could be killed: enlarge the fixture"
    assert finished >= 5
    report = mbeir.convert_train(fx.train_queries, fx.pool, fx.root, out, shard_size=1, workers=2)
    assert report["resumed_shards"] == finished  # done files are renamed into place: each one is whole
    assert report["queries"]["kept"] == 200
    assert tree(out) == tree(reference)


def test_mmeb_train_writes_the_same_bytes_with_one_and_two_workers(tmp_path):
    from PIL import Image

    from unimm.data.convert import mmeb

    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "images" / "a.jpg")
    for name in ("OK-VQA", "MSCOCO_i2t"):
        _parquet(tmp_path / "train" / name / "train.parquet", [
            {"qry": f"<|image_1|> {name} {i}", "qry_image_path": "a.jpg" if i % 3 else "gone.jpg",
             "pos_text": f"answer {i}", "pos_image_path": ""} for i in range(7)])
    reports = [mmeb.convert_mmeb_train(tmp_path / "train", tmp_path / "images", tmp_path / f"w{w}",
                                       ["OK-VQA", "MSCOCO_i2t"], per_dataset=6, shard_size=3, workers=w)
               for w in (1, 2)]
    assert tree(tmp_path / "w1") == tree(tmp_path / "w2")
    assert reports[0]["kept"] == reports[1]["kept"] == 8 and reports[0]["skipped"] == {"image_missing_image": 4}
    keys = [r["__key__"] for shard in read_index(tmp_path / "w1").shards for r in iter_raw_samples(shard.path)]
    assert keys[:4] == ["OK-VQA_0000001", "MSCOCO_i2t_0000001", "OK-VQA_0000002", "MSCOCO_i2t_0000002"]


def test_parallel_map_keeps_the_order_and_reports_each_image(tmp_path):
    from functools import partial

    from PIL import Image

    from unimm.data.convert import mmeb
    from unimm.data.convert.parallel import parallel_map

    for i in range(5):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(tmp_path / f"{i}.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "0.jpg").read_bytes()[:40])
    paths = ["3.jpg", "gone.jpg", "0.jpg", "cut.jpg", "4.jpg", "x.gif", "1.jpg"]
    checked = parallel_map(partial(mmeb._check, str(tmp_path), "structure"), paths, workers=2, chunk=2)
    assert [error and error.reason for _, error in checked] == [None, "missing_image", None, "bad_image", None,
                                                               "unsupported_image_format", None]
    assert str(tmp_path / "cut.jpg") in str(checked[3][1])  # the error names the file
    assert checked[0][0] == (tmp_path / "3.jpg").read_bytes() and checked[6][0] == (tmp_path / "1.jpg").read_bytes()
