"""GradCache gives the gradients of the plain contrastive step: with and without dropout, in 1 and 2 processes.

The reference is written plainly: the same encoder run on the same chunks with autograd all the way through, and
the loss ``CE(q c^T / tau, arange)`` written with torch ops (no unimm loss code).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from unimm.losses import InfoNCE
from unimm.training.gradcache import CoalescedSync, GradCache, GradSync, SyncOnLast, grad_sync

TAU = 0.1
B, D_IN, D = 8, 6, 5


class Tower(nn.Module):
    """A two-layer encoder with dropout: queries and candidates through the same weights, as in VLM2Vec."""

    def __init__(self, p: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D_IN, 16), nn.Tanh(), nn.Dropout(p), nn.Linear(16, D))

    def forward(self, x):
        return F.normalize(self.net(x), dim=-1)


def make_data():
    g = torch.Generator().manual_seed(7)
    return torch.randn(B, D_IN, generator=g, dtype=torch.float64), torch.randn(B, D_IN, generator=g, dtype=torch.float64)


def make_tower(p: float) -> Tower:
    torch.manual_seed(0)
    return Tower(p).double()


def plain_loss(q, c):
    return F.cross_entropy(q @ c.T / TAU, torch.arange(q.shape[0]))


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def reference_grads(p: float, chunk: int, seed: int = 3):
    """Autograd through every chunk's forward, chunks run in GradCache's order (all query chunks, then candidates)."""
    model = make_tower(p)
    q, c = make_data()
    torch.manual_seed(seed)
    qr = torch.cat([model(x) for x in q.split(chunk)])
    cr = torch.cat([model(x) for x in c.split(chunk)])
    loss = plain_loss(qr, cr)
    loss.backward()
    return loss.detach(), grads(model)


def gradcache_grads(p: float, chunk: int, seed: int = 3):
    model = make_tower(p)
    q, c = make_data()
    torch.manual_seed(seed)
    gc = GradCache([model, model])
    loss, _ = gc.step([list(q.split(chunk)), list(c.split(chunk))], lambda a, b: (plain_loss(a, b), {}))
    return loss, grads(model)


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-10, atol=1e-12, msg=name)


def test_equals_full_batch_without_dropout():
    """No dropout: chunking cannot change anything, so GradCache == one forward over the whole batch."""
    model = make_tower(0.0)
    q, c = make_data()
    loss = plain_loss(model(q), model(c))
    loss.backward()
    full = grads(model)
    for chunk in (1, 3, 8):
        gc_loss, gc = gradcache_grads(0.0, chunk)
        torch.testing.assert_close(gc_loss, loss.detach())
        assert_same(gc, full)


@pytest.mark.parametrize("chunk", [2, 3])
def test_equals_plain_step_with_dropout(chunk):
    ref_loss, ref = reference_grads(0.5, chunk)
    gc_loss, gc = gradcache_grads(0.5, chunk)
    torch.testing.assert_close(gc_loss, ref_loss)
    assert_same(gc, ref)
    # the dropout masks matter: another seed gives other gradients, so the equality above needs the RNG replay
    _, other = reference_grads(0.5, chunk, seed=4)
    assert not torch.allclose(other["net.0.weight"], ref["net.0.weight"])


def test_rng_replay_leaves_global_rng_where_the_cache_pass_left_it():
    model = make_tower(0.5)
    q, c = make_data()
    gc = GradCache([model, model])
    torch.manual_seed(5)
    cached = gc.cache([list(q.split(4)), list(c.split(4))])
    after_cache = torch.get_rng_state()
    leaves = cached.leaves()
    gc.replay([list(q.split(4)), list(c.split(4))], cached, gc.rep_grads(plain_loss(*leaves), leaves))
    assert torch.equal(torch.get_rng_state(), after_cache)


def test_no_sync_entered_for_every_backward_but_the_last():
    entered = []

    class Recorder:
        def __enter__(self):
            entered.append(True)

        def __exit__(self, *exc):
            return False

    model = make_tower(0.0)
    q, c = make_data()
    backward_calls = []
    gc = GradCache([model, model], backward=lambda t: (backward_calls.append(1), t.backward()),
                  sync=SyncOnLast(Recorder))
    gc.step([list(q.split(2)), list(c.split(4))], lambda a, b: (plain_loss(a, b), {}))
    # backwards: 1 loss + 4 query chunks + 2 candidate chunks = 7; all but the last one unsynchronised
    assert len(backward_calls) == 7
    assert len(entered) == 6


def test_strategy_scaling_of_the_loss_is_applied_once():
    """A backward that scales every loss by k (a GradScaler's scale, DeepSpeed's 1/gradient_accumulation_steps)
    must give k x the plain gradients: the cached rep gradients are unscaled, so the replay scales them once
    (backpropagating the scaled leaf gradients through a scaling backward again would give k^2)."""
    ref_loss, ref = reference_grads(0.5, 2)
    model = make_tower(0.5)
    q, c = make_data()
    torch.manual_seed(3)
    gc = GradCache([model, model], backward=lambda t: (t * 4.0).backward())
    loss, _ = gc.step([list(q.split(2)), list(c.split(2))], lambda a, b: (plain_loss(a, b), {}))
    torch.testing.assert_close(loss, ref_loss)
    assert_same(grads(model), {name: 4.0 * g for name, g in ref.items()})


def test_loss_owned_parameters_get_their_gradient():
    """A learnable temperature lives in the loss: stage 2's backward gives it the plain step's gradient."""
    log_scale = {}

    def run(gradcache: bool):
        model = make_tower(0.0)
        scale = nn.Parameter(torch.tensor([2.0], dtype=torch.float64))
        q, c = make_data()

        def loss_fn(a, b):
            return F.cross_entropy(a @ b.T * scale.exp(), torch.arange(a.shape[0])), {}

        if gradcache:
            GradCache([model, model]).step([list(q.split(3)), list(c.split(3))], loss_fn)
        else:
            loss_fn(model(q), model(c))[0].backward()
        log_scale[gradcache] = scale.grad.clone()
        return grads(model)

    assert_same(run(True), run(False))
    torch.testing.assert_close(log_scale[True], log_scale[False], rtol=1e-10, atol=1e-12)
    assert log_scale[True].abs().item() > 0


def test_grad_sync_is_chosen_from_what_the_model_can_do():
    entered = []

    class Engine:  # what GradCache uses of a DeepSpeed engine
        @contextlib.contextmanager
        def coalesce_grad_reduction(self):
            entered.append("coalesce")
            yield

    class OldEngine:  # a DeepSpeed engine from before coalesce_grad_reduction
        def zero_optimization_partition_gradients(self):
            return True

    sync = grad_sync(Engine(), no_sync=contextlib.nullcontext)
    assert isinstance(sync, CoalescedSync)
    with sync.step():
        pass
    assert entered == ["coalesce"]
    with pytest.raises(RuntimeError, match="coalesce_grad_reduction"):
        grad_sync(OldEngine())
    assert isinstance(grad_sync(nn.Linear(1, 1), no_sync=contextlib.nullcontext), SyncOnLast)
    assert type(grad_sync(nn.Linear(1, 1))) is GradSync


def test_every_backward_of_a_step_runs_inside_the_sync_step_context():
    """CoalescedSync reduces when its step context exits: no backward may run outside it."""
    state = {"inside": False, "outside_backwards": 0, "backwards": 0}

    class Sync(GradSync):
        @contextlib.contextmanager
        def step(self):
            state["inside"] = True
            yield
            state["inside"] = False

    def backward(t):
        state["backwards"] += 1
        state["outside_backwards"] += not state["inside"]
        t.backward()

    model = make_tower(0.0)
    q, c = make_data()
    GradCache([model, model], backward=backward, sync=Sync()).step([list(q.split(4)), list(c.split(4))],
                                                                     lambda a, b: (plain_loss(a, b), {}))
    assert state == {"inside": False, "outside_backwards": 0, "backwards": 5}


# -- 2 processes (gloo): DDP + InfoNCE gathered across ranks == 1 process on the whole batch ---------------------
def _ddp_gradcache(rank, world, p, chunk):
    model = make_tower(p)
    ddp = DistributedDataParallel(model)
    q, c = make_data()
    half = B // world
    q, c = q[rank * half:(rank + 1) * half], c[rank * half:(rank + 1) * half]
    torch.manual_seed(100 + rank)
    loss_fn = InfoNCE(temperature=TAU, gather=True)
    gc = GradCache([ddp, ddp], sync=grad_sync(ddp, ddp.no_sync))
    gc.step([list(q.split(chunk)), list(c.split(chunk))], lambda a, b: (loss_fn(a, b).loss, {}))
    return grads(model)


@pytest.mark.distributed
def test_two_processes_equal_one_process_full_batch():
    from _dist import run_distributed

    model = make_tower(0.0)
    q, c = make_data()
    plain_loss(model(q), model(c)).backward()
    full = grads(model)
    per_rank = run_distributed(_ddp_gradcache, 2, 0.0, 2)
    for g in per_rank:  # DDP all-reduced (averaged) once, on the last chunk: every rank holds the full-batch grad
        for name in full:
            torch.testing.assert_close(g[name], full[name], rtol=1e-9, atol=1e-12, msg=name)
