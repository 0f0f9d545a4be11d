"""CC3M TSV, VisDial and MMDialog converters on fixture files in their official layouts; the MMDialog recall."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from unimm.data.benchmark import load_benchmark, read_qrels
from unimm.data.convert.cc3m import convert_cc3m
from unimm.data.convert.mmdialog import convert_mmdialog, text_id
from unimm.data.convert.visdial import convert_visdial
from unimm.data.records import decode_sample
from unimm.data.shards import iter_raw_samples, read_index
from unimm.eval.candidate_lists import candidate_list_recall


def _jpg(path, colour=(200, 10, 10)):
    Image.fromarray(np.full((8, 8, 3), colour, np.uint8)).save(path, format="JPEG")


def _records(shard_set):
    return [decode_sample(raw) for shard in read_index(shard_set).shards for raw in iter_raw_samples(shard.path)]


def test_cc3m_tsv_counts_missing_and_broken_images(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    _jpg(images / "dog.jpg")
    _jpg(images / "tree.jpg", (0, 200, 0))
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    tsv = tmp_path / "cc3m_val.tsv"
    tsv.write_text("caption\timage\nA picture of a dog\tdog.jpg\nTree\ttree.jpg\nGone\tmissing.jpg\n"
                   "Broken\tbroken.jpg\n\ttree.jpg\n")
    report = convert_cc3m(tsv, images, tmp_path / "out", shard_size=1)
    assert report["lines"] == 5 and report["kept"] == 2
    assert report["skipped"] == {"missing_image": 1, "bad_image": 1, "empty_caption": 1}
    assert report["examples"]["bad_image"][0].startswith("broken.jpg: ") and report["verify_images"] == "structure"
    assert json.loads((tmp_path / "out" / "convert_report.json").read_text())["kept"] == 2
    recs = sorted(_records(tmp_path / "out"), key=lambda r: r.meta["image"])
    assert [r.sides["query"].text for r in recs] == ["A picture of a dog", "Tree"]
    assert recs[1].sides["pos"].image.getpixel((4, 4))[1] > 150  # the tree image is the green one
    assert read_index(tmp_path / "out").total == 2


def test_cc3m_verify_images_decode_also_skips_a_damaged_but_whole_jpeg(tmp_path):
    from test_image_files import flipped_huffman_table, pil_decodes

    from unimm.data.convert.__main__ import main as convert_main

    images = tmp_path / "images"
    images.mkdir()
    _jpg(images / "dog.jpg")
    _jpg(images / "tree.jpg", (0, 200, 0))
    (images / "tree.jpg").write_bytes(flipped_huffman_table((images / "tree.jpg").read_bytes()))
    assert not pil_decodes((images / "tree.jpg").read_bytes())
    tsv = tmp_path / "cc3m_val.tsv"
    tsv.write_text("caption\timage\nA dog\tdog.jpg\nTree\ttree.jpg\n")
    for level, kept, skipped in (("structure", 2, {}), ("decode", 1, {"bad_image": 1})):
        convert_main(["cc3m", "--tsv", str(tsv), "--images", str(images), "--out", str(tmp_path / level),
                      "--verify-images", level])
        report = json.loads((tmp_path / level / "convert_report.json").read_text())
        assert (report["verify_images"], report["kept"], report["skipped"]) == (level, kept, skipped)
    assert report["examples"]["bad_image"][0].startswith("tree.jpg: ")


def _visdial_fixture(tmp_path):
    img_dir = tmp_path / "VisualDialog_val2018"
    img_dir.mkdir()
    for image_id, colour in ((7, (255, 0, 0)), (42, (0, 0, 255))):
        _jpg(img_dir / f"VisualDialog_val2018_{image_id:012d}.jpg", colour)
    turns = [{"question": 0, "answer": 0, "answer_options": [0, 1], "gt_index": 0},
             {"question": 1, "answer": 1, "answer_options": [0, 1], "gt_index": 1}]
    data = {"version": "1.0", "split": "val2018", "data": {
        "questions": ["is it red", "is it big"], "answers": ["yes", "no"],
        "dialogs": [{"image_id": 7, "caption": "a red thing", "dialog": turns},
                    {"image_id": 42, "caption": "a blue thing", "dialog": turns},
                    {"image_id": 99, "caption": "lost", "dialog": turns}]}}
    path = tmp_path / "visdial_1.0_val.json"
    path.write_text(json.dumps(data))
    return path, img_dir


def test_visdial_both_directions_per_round(tmp_path):
    path, img_dir = _visdial_fixture(tmp_path)
    report = convert_visdial(path, img_dir, tmp_path / "bench", rounds=(1, 2))
    assert report["kept"] == 2 and report["skipped"] == {"missing_image": 1}
    assert report["verify_images"] == "structure"
    bench = load_benchmark(tmp_path / "bench")
    assert [e.name for e in bench.evaluations] == ["visdial_d2i_r1", "visdial_i2d_r1", "visdial_d2i_r2", "visdial_i2d_r2"]
    d2i = {r.key: r for r in _records(bench.evaluation("visdial_d2i_r2").queries)}
    assert d2i["dlg7"].sides["query"].text == "Q: is it red? A: yes. Q: is it big? A: no."
    r1 = {r.key: r for r in _records(bench.evaluation("visdial_d2i_r1").queries)}
    assert r1["dlg42"].sides["query"].text == "Q: is it red? A: yes."
    d2i_qrels = read_qrels(bench.evaluation("visdial_d2i_r1").qrels)
    assert {k: set(v) for k, v in d2i_qrels.items()} == {"dlg7": {"7"}, "dlg42": {"42"}}
    i2d = bench.evaluation("visdial_i2d_r2")
    assert {k: set(v) for k, v in read_qrels(i2d.qrels).items()} == {"img7": {"dlg7"}, "img42": {"dlg42"}}
    pool = {r.meta["did"]: r for r in _records(bench.pools[i2d.pool])}
    assert pool["dlg42"].sides["cand"].text == d2i["dlg42"].sides["query"].text


def test_mmdialog_context_and_candidates(tmp_path):
    split = tmp_path / "test"
    split.mkdir()
    for key in ("111", "-222", "333", "444", "555", "666"):
        _jpg(split / f"{key}.jpg")
    conversations = [
        {"conversation_id": 0, "conversation": [
            {"turn": [{"__TEXT__": "look at this"}, {"__MEDIA__": "111"}]},
            {"turn": [{"__TEXT__": "nice, here is mine"}, {"__MEDIA__": "-222"}, {"__MEDIA__": "666"}]}],
         "negative_candidate_media_keys": ["333", "444", "missing", "666"],
         "negative_candidate_texts": ["x", "", "nice, here is mine"]},
        {"conversation_id": 1, "conversation": [{"turn": [{"__TEXT__": "hi"}]}, {"turn": [{"__TEXT__": "hello"}]}],
         "negative_candidate_media_keys": ["555"], "negative_candidate_texts": ["y", "x"]},
        {"conversation_id": 2, "conversation": [{"turn": [{"__TEXT__": "alone"}]}]},
    ]
    (split / "conversations.json").write_text("\n".join(json.dumps(c) for c in conversations))  # JSON lines
    report = convert_mmdialog(split, tmp_path / "bench")
    assert report["kept"] == 2 and report["image_queries"] == 2 and report["text_queries"] == 2
    assert report["skipped"] == {"candidate_missing_image": 1, "empty_text": 1, "empty_context": 1}
    assert report["verify_images"] == "structure"
    bench = load_benchmark(tmp_path / "bench")
    images = {r.key: r for r in _records(bench.evaluation("mmdialog_image_response").queries)}
    assert sorted(images) == ["c0i0", "c0i1"]
    # element j ranks itself + the negatives (the one identical to it left out); the response groups them
    assert images["c0i0"].meta["candidates"] == ["-222", "333", "444", "666"]
    assert images["c0i1"].meta["candidates"] == ["666", "333", "444"]
    assert images["c0i1"].meta["response"] == "c0"
    query = images["c0i0"]
    assert query.sides["ctx.0"].text == "look at this" and query.sides["query"].image is not None
    spec = bench.evaluation("mmdialog_image_response")
    assert {r.meta["did"] for r in _records(bench.pools[spec.pool])} == {"111", "-222", "333", "444", "555", "666"}
    texts = {r.key: r for r in _records(bench.evaluation("mmdialog_text_response").queries)}
    assert sorted(texts) == ["c0t0", "c1t0"]
    assert texts["c0t0"].meta["candidates"] == [text_id("nice, here is mine"), text_id("x")]
    assert texts["c1t0"].meta["candidates"] == [text_id(t) for t in ("hello", "y", "x")]
    assert texts["c1t0"].sides["query"].text == "hi" and "ctx.0" not in texts["c1t0"].sides
    pool = {r.meta["did"]: r.sides["cand"].text for r in _records(bench.pools["mmdialog_texts"])}
    assert pool == {text_id(t): t for t in ("nice, here is mine", "x", "hello", "y")}


def test_candidate_list_recall_by_hand():
    pool = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [-1.0, 0.0]])
    metas = [{"did": d} for d in "abcd"]
    queries = np.array([[1.0, 0.0], [1.0, 0.0]])
    # query 0: positive a scores 1.0, best of its list -> hit at 1
    # query 1: positive b scores 0 vs c 0.7 and a 1.0 -> rank 3: miss at 1, hit at 5; d is not its candidate
    qmetas = [{"candidates": ["a", "b", "c"]}, {"candidates": ["b", "c", "a", "d"]}]
    got = candidate_list_recall(queries, qmetas, pool, metas, (1, 2, 5))
    assert got == {"recall@1": 50.0, "recall@2": 50.0, "recall@5": 100.0}


def test_candidate_list_recall_averages_elements_per_response_and_ties_count_against():
    pool = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    metas = [{"did": d} for d in "abc"]
    queries = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # response r: element 1 hits at 1 (a: 1 vs b: 0), element 2 misses at 1 (b: 0 vs a: 1) -> 50 for r
    # response s: its positive b ties with c (both 1): c ranks first -> miss at 1, hit at 2
    qmetas = [{"response": "r", "candidates": ["a", "b"]}, {"response": "r", "candidates": ["b", "a"]},
              {"response": "s", "candidates": ["b", "c"]}]
    got = candidate_list_recall(queries, qmetas, pool, metas, (1, 2))
    assert got == {"recall@1": 25.0, "recall@2": 100.0}
    assert candidate_list_recall(queries[:0], [], pool, metas, (1,)) == {}


def test_visdial_and_mmdialog_command_lines_take_the_verification_level(tmp_path):
    from unimm.data.convert.__main__ import main as convert_main

    path, img_dir = _visdial_fixture(tmp_path)
    convert_main(["visdial", "--json", str(path), "--images", str(img_dir), "--out", str(tmp_path / "visdial"),
                  "--verify-images", "decode"])
    split = tmp_path / "test"
    split.mkdir()
    _jpg(split / "1.jpg")
    (split / "conversations.json").write_text(json.dumps([{"conversation_id": 0, "conversation": [
        {"turn": [{"__TEXT__": "hi"}, {"__MEDIA__": "1"}]}, {"turn": [{"__TEXT__": "hello"}]}],
        "negative_candidate_media_keys": [], "negative_candidate_texts": ["bye"]}]))
    convert_main(["mmdialog", "--split-dir", str(split), "--out", str(tmp_path / "mmdialog"), "--verify-images",
                  "decode"])
    for out in ("visdial", "mmdialog"):
        assert json.loads((tmp_path / out / "convert_report.json").read_text())["verify_images"] == "decode"
