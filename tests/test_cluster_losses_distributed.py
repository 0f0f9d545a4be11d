"""PartialFC with class centres sharded over 2 CPU processes equals the unsharded loss on the same data."""

from __future__ import annotations

import pytest
import torch

from tests._dist import run_distributed
from unimm.losses.cluster import ArcFaceSoftmax, MultiLabelClusterLoss, PartialFC, class_range

NUM_CLASSES, DIM, BATCH, WORLD = 7, 5, 3, 2  # 7 classes over 2 ranks: blocks of 4 and 3


def _data(num_labels: int):
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(WORLD * BATCH, DIM, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (WORLD * BATCH, num_labels), generator=gen)
    if num_labels > 1:
        labels[:, 1] = (labels[:, 0] + 1 + labels[:, 1] % (NUM_CLASSES - 1)) % NUM_CLASSES  # distinct labels
    weight = torch.randn(NUM_CLASSES, DIM, generator=gen)
    return emb, labels, weight


def _objective(kind: str):
    if kind == "arcface":
        return ArcFaceSoftmax(scale=8.0, margin=0.3, straight_through=False), 1, None
    if kind == "arcface_feat":
        return ArcFaceSoftmax(scale=8.0, margin=0.3), 1, 3
    return MultiLabelClusterLoss(scale=4.0, margin=0.2), 2, None


def _sharded_one(rank: int, world_size: int, kind: str):
    objective, num_labels, num_feat = _objective(kind)
    emb, labels, weight = _data(num_labels)
    pfc = PartialFC(NUM_CLASSES, DIM, objective, sample_rate=1.0, num_feat=num_feat)
    pfc.shard(rank, world_size)
    start, end = class_range(NUM_CLASSES, rank, world_size)
    assert pfc.weight.shape == (end - start, DIM)  # only this rank's block exists here
    with torch.no_grad():
        pfc.weight.copy_(weight[start:end])
    local = emb[rank * BATCH:(rank + 1) * BATCH].clone().requires_grad_()
    out = pfc(local, labels[rank * BATCH:(rank + 1) * BATCH])
    out.loss.backward()
    return {"loss": out.loss.detach(), "emb_grad": local.grad, "weight_grad": pfc.weight.grad}


def _sharded(rank: int, world_size: int, kinds: list[str]):
    return {kind: _sharded_one(rank, world_size, kind) for kind in kinds}


KINDS = ["arcface", "arcface_feat", "mlcd"]


@pytest.fixture(scope="module")
def sharded_results():
    """One 2-process run computes every case (spawning processes costs seconds each)."""
    return run_distributed(_sharded, WORLD, KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_sharded_equals_unsharded(kind, sharded_results):
    results = [r[kind] for r in sharded_results]
    objective, num_labels, num_feat = _objective(kind)
    emb, labels, weight = _data(num_labels)
    emb.requires_grad_()
    pfc = PartialFC(NUM_CLASSES, DIM, objective, sample_rate=1.0, num_feat=num_feat)
    with torch.no_grad():
        pfc.weight.copy_(weight)
    out = pfc(emb, labels)
    out.loss.backward()
    for r in results:  # every rank holds the global loss
        assert r["loss"].item() == pytest.approx(out.loss.item(), rel=1e-5)
    # centres: each rank's block gets exactly its rows of the unsharded gradient (they are not DDP-averaged)
    torch.testing.assert_close(torch.cat([r["weight_grad"] for r in results]), pfc.weight.grad, rtol=1e-4, atol=1e-6)
    # embeddings: W x the unsharded gradient, so that DDP's average over ranks gives the backbone the same update
    emb_grad = torch.cat([r["emb_grad"] for r in results]) / WORLD
    torch.testing.assert_close(emb_grad, emb.grad, rtol=1e-4, atol=1e-6)
