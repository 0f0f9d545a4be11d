"""InfoNCE with cross-rank gather on 2 gloo processes == InfoNCE on the concatenated batch in 1 process.

One spawn (module fixture) computes every case in both ranks; the tests compare in the parent with a
reference written with plain torch ops (no unimm code), on the same fixed batch.
"""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _dist import run_distributed

from unimm.losses import InfoNCE, gather_no_grad, gather_with_grad

pytestmark = pytest.mark.distributed

WORLD = 2
B_GLOBAL, D, N_NEG = 8, 5, 2
TEMPERATURE = 0.1
LOG_SCALE0 = math.log(1 / 0.07)  # CLIP's initial learnable scale
# (name, symmetric, learnable logit scale, hard negatives)
CASES = [
    ("q2c_temperature", False, False, False),
    ("q2c_scale", False, True, False),
    ("symmetric_scale", True, True, False),
    ("q2c_scale_hardneg", False, True, True),
    ("symmetric_temperature_hardneg", True, False, True),
]


def make_batch():
    g = torch.Generator().manual_seed(1234)  # same batch in every process
    q = torch.randn(B_GLOBAL, D, generator=g, dtype=torch.float64)
    c = torch.randn(B_GLOBAL, D, generator=g, dtype=torch.float64)
    neg = torch.randn(B_GLOBAL, N_NEG, D, generator=g, dtype=torch.float64)
    return q, c, neg


def _worker(rank, world_size):
    q, c, neg = make_batch()
    b = B_GLOBAL // world_size
    rows = slice(rank * b, (rank + 1) * b)
    results = {}
    for name, symmetric, use_scale, use_hn in CASES:
        ql, cl, nl = (t[rows].clone().requires_grad_() for t in (q, c, neg))
        log_scale = torch.tensor(LOG_SCALE0, dtype=torch.float64, requires_grad=True)
        out = InfoNCE(temperature=TEMPERATURE, symmetric=symmetric)(
            F.normalize(ql, dim=-1),
            F.normalize(cl, dim=-1),
            logit_scale=log_scale.exp() if use_scale else None,
            hard_negatives=F.normalize(nl, dim=-1) if use_hn else None,
        )
        out.loss.backward()
        # Simulate DDP. The logit scale is a replicated parameter whose local grad only holds this
        # rank's loss, so DDP's all-reduce-mean applies. The embeddings come out of a replicated
        # encoder: their grads already hold every rank's loss (the gather's backward sums them), and
        # DDP then divides the encoder's parameter grads by world_size; by linearity of the chain
        # rule, that is the same as dividing the embedding grads by world_size.
        if use_scale:
            dist.all_reduce(log_scale.grad)
        results[name] = {
            "loss": out.loss.detach(),
            "accuracy": out.accuracy,
            "logits_shape": list(out.logits.shape),
            "grad_q": ql.grad / world_size,
            "grad_c": cl.grad / world_size,
            "grad_neg": nl.grad / world_size if use_hn else torch.zeros(0),
            "grad_log_scale": log_scale.grad / world_size if use_scale else torch.zeros(0),
        }

    # Unequal batch sizes: both ranks must get the clear error (and not hang in the collective).
    try:
        InfoNCE()(torch.zeros(3 + rank, D), torch.zeros(3 + rank, D))
        results["unequal_error"] = ""
    except ValueError as e:
        results["unequal_error"] = str(e)
    try:
        gather_with_grad(torch.zeros(2, 3 + rank))
        results["unequal_dim_error"] = ""
    except ValueError as e:
        results["unequal_dim_error"] = str(e)
    # Evaluation gather accepts uneven shards: rank r contributes r+1 rows filled with r.
    results["no_grad_gather"] = gather_no_grad(torch.full((rank + 1, 2), float(rank)))
    return results


def reference(symmetric, use_scale, use_hn):
    """Loss and grads on the full batch in one process, with plain torch ops."""
    q, c, neg = (t.clone().requires_grad_() for t in make_batch())
    log_scale = torch.tensor(LOG_SCALE0, dtype=torch.float64, requires_grad=True)
    s = log_scale.exp() if use_scale else 1 / TEMPERATURE
    qn, cn, nn_ = F.normalize(q, dim=-1), F.normalize(c, dim=-1), F.normalize(neg, dim=-1)
    labels = torch.arange(B_GLOBAL)
    logits = s * qn @ cn.T
    if use_hn:
        logits = torch.cat([logits, s * (qn[:, None, :] * nn_).sum(-1)], dim=1)
    loss = F.cross_entropy(logits, labels)
    if symmetric:
        loss = (loss + F.cross_entropy(s * cn @ qn.T, labels)) / 2
    loss.backward()
    acc = (logits.argmax(1) == labels).double().mean()
    return loss.detach(), acc, q.grad, c.grad, neg.grad, log_scale.grad


@pytest.fixture(scope="module")
def ranks():
    return run_distributed(_worker, WORLD)


@pytest.mark.parametrize("name,symmetric,use_scale,use_hn", CASES, ids=[c[0] for c in CASES])
def test_gathered_loss_and_grads_equal_single_process(ranks, name, symmetric, use_scale, use_hn):
    loss, acc, gq, gc, gneg, gscale = reference(symmetric, use_scale, use_hn)
    r = [ranks[k][name] for k in range(WORLD)]
    b = B_GLOBAL // WORLD
    # Mean of the per-rank local losses (what DDP's gradient averaging optimises) == full-batch loss.
    mean_loss = sum(x["loss"] for x in r) / WORLD
    assert torch.allclose(mean_loss, loss, atol=1e-6), (mean_loss, loss)
    # Each rank's loss is a different local block, so the test would catch a rank-0-only computation.
    assert not torch.allclose(r[0]["loss"], r[1]["loss"])
    assert sum(x["accuracy"].item() for x in r) / WORLD == pytest.approx(acc.item())
    for k in range(WORLD):
        assert r[k]["logits_shape"] == [b, B_GLOBAL + (N_NEG if use_hn else 0)]
        rows = slice(k * b, (k + 1) * b)
        torch.testing.assert_close(r[k]["grad_q"], gq[rows], atol=1e-6, rtol=0)
        torch.testing.assert_close(r[k]["grad_c"], gc[rows], atol=1e-6, rtol=0)
        if use_hn:
            torch.testing.assert_close(r[k]["grad_neg"], gneg[rows], atol=1e-6, rtol=0)
        if use_scale:
            torch.testing.assert_close(r[k]["grad_log_scale"], gscale, atol=1e-6, rtol=0)


def test_unequal_batch_sizes_raise_clear_error(ranks):
    for k in range(WORLD):
        msg = ranks[k]["unequal_error"]
        assert "same batch shape" in msg and "rank 0: [3, 5]" in msg and "rank 1: [4, 5]" in msg, msg
        msg = ranks[k]["unequal_dim_error"]
        assert "rank 0: [2, 3]" in msg and "rank 1: [2, 4]" in msg, msg


def test_gather_no_grad_uneven_shards(ranks):
    expected = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])  # rank 0's 1 row, then rank 1's 2
    for k in range(WORLD):
        assert torch.equal(ranks[k]["no_grad_gather"], expected)
