"""Offline clustering: chunked extraction, seeded k-means, streamed top-l assignment, labels and collator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from unimm.clustering import __main__ as cli
from unimm.clustering.kmeans import iter_feature_chunks, sample_rows, top_l
from unimm.data.labels import ClusterLabelCollator, ClusterLabels, write_labels
from unimm.data.records import Item, Record


def _write_features(root, vectors: np.ndarray, chunk: int):
    """A features folder in the layout extract_features writes, from vectors given by the test."""
    root.mkdir(parents=True, exist_ok=True)
    chunks = []
    for i, start in enumerate(range(0, len(vectors), chunk)):
        part = vectors[start:start + chunk]
        np.save(root / f"features-{i:05d}.npy", part.astype(np.float32))
        np.save(root / f"keys-{i:05d}.npy", np.asarray([f"k{j:05d}" for j in range(start, start + len(part))]))
        chunks.append({"features": f"features-{i:05d}.npy", "keys": f"keys-{i:05d}.npy", "count": len(part)})
    (root / "features.json").write_text(json.dumps({"chunks": chunks, "count": len(vectors)}))
    return root


def _blobs(n_per: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Four well separated directions on the unit sphere (+ noise), with their blob ids."""
    rng = np.random.default_rng(seed)
    centres = np.eye(8, dtype=np.float32)[:4] * 5
    x = np.concatenate([c + rng.normal(size=(n_per, 8)).astype(np.float32) * 0.3 for c in centres])
    return x / np.linalg.norm(x, axis=1, keepdims=True), np.repeat(np.arange(4), n_per)


def test_top_l_matches_brute_force_in_small_chunks():
    import faiss

    rng = np.random.default_rng(0)
    feats, cents = rng.normal(size=(50, 6)).astype(np.float32), rng.normal(size=(9, 6)).astype(np.float32)
    index = faiss.IndexFlatIP(6)
    index.add(cents)
    got = top_l(index, feats, 3, chunk_size=7)  # 50 rows in chunks of 7
    expected = np.argsort(-(feats @ cents.T), axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(got, expected)


def test_sample_rows_reads_across_chunks(tmp_path):
    x = np.arange(30 * 2, dtype=np.float32).reshape(30, 2)
    feats = _write_features(tmp_path / "f", x, chunk=7)
    s = sample_rows(feats, 10, seed=3)
    picked = np.sort(np.random.default_rng(3).choice(30, size=10, replace=False))
    np.testing.assert_array_equal(s, x[picked])
    assert [len(k) for k, _ in iter_feature_chunks(feats)] == [7, 7, 7, 7, 2]


def test_cluster_assign_recovers_blobs_and_is_stable_for_a_seed(tmp_path):
    x, blob = _blobs()
    feats = _write_features(tmp_path / "f", x, chunk=64)
    runs = []
    for i in range(2):
        cli.main(["cluster", "--features", str(feats), "--k", "4", "--out", str(tmp_path / f"c{i}.npy"), "--seed", "1"])
        cli.main(["assign", "--features", str(feats), "--centroids", str(tmp_path / f"c{i}.npy"),
                  "--out", str(tmp_path / f"labels{i}"), "--top-l", "2", "--chunk-size", "50"])
        runs.append(ClusterLabels(tmp_path / f"labels{i}"))
    np.testing.assert_array_equal(runs[0].labels, runs[1].labels)  # same seed, same labels
    labels = runs[0].lookup([f"k{j:05d}" for j in range(len(x))])
    assert labels.shape == (160, 2) and runs[0].num_classes == 4
    # each blob is one cluster, and different blobs different clusters
    for b in range(4):
        assert len(np.unique(labels[blob == b, 0])) == 1
    assert len(np.unique(labels[:, 0])) == 4
    assert (labels[:, 0] != labels[:, 1]).all()  # top-2 are two different centres


def test_labels_lookup_and_missing_keys(tmp_path):
    write_labels(tmp_path, ["b", "a", "c"], np.array([[1, 2], [3, 4], [5, 6]]), {"num_classes": 7, "top_l": 2})
    labels = ClusterLabels(tmp_path)
    np.testing.assert_array_equal(labels.lookup(["a", "zz", "c"]), [[3, 4], [-1, -1], [5, 6]])
    np.testing.assert_array_equal(ClusterLabels(tmp_path, num_labels=1).lookup(["b"]), [[1]])
    with pytest.raises(ValueError, match="duplicate"):
        write_labels(tmp_path / "dup", ["a", "a"], np.zeros((2, 1)), {"num_classes": 1})


class _Processor:
    def images(self, images):
        return torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) for im in images])


def test_collator_takes_the_first_side_with_an_image(tmp_path):
    from PIL import Image

    write_labels(tmp_path, ["r1", "r2"], np.array([[4], [2]]), {"num_classes": 5, "top_l": 1})
    red, blue = Image.new("RGB", (2, 2), (255, 0, 0)), Image.new("RGB", (2, 2), (0, 0, 255))
    records = [
        Record("r1", {"query": Item(text="a caption"), "pos": Item(image=red)}),
        Record("r2", {"query": Item(image=blue), "pos": Item(text="a caption")}),
        Record("r3", {"query": Item(image=blue), "pos": Item(image=red)}),
    ]
    batch = ClusterLabelCollator(_Processor(), sides=("pos", "query"), labels_dir=str(tmp_path))(records)
    pix = batch["image"]["pixel_values"]
    assert pix.shape == (3, 3, 2, 2)
    assert pix[0, 0, 0, 0] == 255 and pix[1, 2, 0, 0] == 255 and pix[2, 0, 0, 0] == 255  # red, blue, red (pos first)
    assert batch["labels"].tolist() == [[4], [2], [-1]]  # r3 has no label
    with pytest.raises(ValueError, match="no image"):
        ClusterLabelCollator(_Processor(), sides=("pos",))([records[1]])


def test_training_batches_pair_each_image_with_its_records_labels(toy_data_dir, tmp_path):
    """Through the real data module (shuffled, 2 loader workers): labels written from the toy's true digits come back
    beside the same record's digit, and the training pixels equal those the linear probe embeds for that key."""
    from functools import partial

    from unimm.data.datamodule import ShardDataModule
    from unimm.models.image_processor import clip_image_processor

    train = str(toy_data_dir / "toy" / "train")

    def datamodule(labels_dir, workers):
        dm = ShardDataModule(train_sets={"toy": {"path": train}}, train_sides=["pos", "query"], batch_size=64,
                             collator=partial(ClusterLabelCollator, labels_dir=labels_dir), num_workers=workers,
                             shuffle_buffer=1000)
        dm.attach_processor(clip_image_processor(32))
        return dm

    probe_pixels, digits = {}, {}
    for batch in datamodule(None, 0).eval_loader(train, sides=("pos", "query")):
        for key, meta, pix in zip(batch["keys"], batch["meta"], batch["image"]["pixel_values"]):
            probe_pixels[key], digits[key] = pix, meta["digit"]
    keys = sorted(digits)
    write_labels(tmp_path, keys, np.array([[digits[k], 10 + digits[k]] for k in keys]), {"num_classes": 20, "top_l": 2})
    seen = 0
    for batch in datamodule(str(tmp_path), 2).train_dataloader():
        assert batch["labels"].tolist() == [[m["digit"], 10 + m["digit"]] for m in batch["meta"]]
        assert batch["labels"][:, 0].tolist() == [digits[k] for k in batch["keys"]]
        expected = torch.stack([probe_pixels[k] for k in batch["keys"]])
        torch.testing.assert_close(batch["image"]["pixel_values"], expected, atol=0, rtol=0)
        seen += len(batch["keys"])
    assert seen >= 2900  # full batches of the 3000 records
