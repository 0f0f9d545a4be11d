"""GradCache under a real DeepSpeed ZeRO-2 engine (2 CPU processes, gloo) gives the plain step's gradients
(and under ZeRO-3 too).

ZeRO-2 reduces and partitions gradients in per-parameter backward hooks, so a GradCache step, which makes one
backward per chunk, must not let each backward reduce on its own: GradCache runs the step's backwards inside
``engine.coalesce_grad_reduction()`` (:func:`unimm.training.gradcache.grad_sync`). The naive way, one
``engine.backward`` per chunk, silently gives wrong gradients here (a regression guard below).

References are written plainly: the full batch through the tower with autograd in one process (no dropout), and
the ordinary DeepSpeed step (every chunk's forward with autograd, one ``engine.backward``) with the same dropout
masks. The loss is ``CE(q c^T / tau, arange)`` over the gathered global batch.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests._dist import run_distributed
from tests.test_gradcache import TAU, B, make_data, make_tower, plain_loss
from unimm.losses import InfoNCE
from unimm.training.gradcache import CoalescedSync, GradCache, grad_sync

deepspeed = pytest.importorskip("deepspeed", reason="the deepspeed extra (installed by `make test`)")
pytestmark = pytest.mark.distributed

LR = 0.5
CHUNK = 2
TIGHT = dict(rtol=1e-5, atol=5e-6)  # fp32 gradients of size ~1-10, summed in another order by the reductions


def _engine(p: float, stage: int = 2):
    """A fresh ZeRO engine over the same initial tower (fp32), with plain SGD so an update is ``-LR * grad``."""
    model = make_tower(p).float()
    # stage 3: partition every parameter, however small (the default keeps tiny ones whole on every rank)
    config = {"train_micro_batch_size_per_gpu": B // 2,
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
              "gradient_clipping": 0.0,  # DeepSpeed clips to norm 1.0 unless told
              "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, config=config,
                                      optimizer=torch.optim.SGD(model.parameters(), lr=LR))
    return engine, model


def _full_grads(model) -> dict[str, torch.Tensor]:
    """The reduced gradient of every parameter, gathered from ZeRO's partitions."""
    from deepspeed.utils import safe_get_full_grad

    return {n: safe_get_full_grad(p).clone() for n, p in model.named_parameters()}


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _under_zero2(rank, world):
    """Per dropout rate (0.0, 0.5): the gradients and updated parameters of each way of stepping, on this rank;
    and GradCache's gradients under ZeRO-3 (no dropout)."""
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    out = {p: _steps(rank, world, p) for p in (0.0, 0.5)}
    q, c = (x.float()[rank * B // world:(rank + 1) * B // world] for x in make_data())
    engine, model = _engine(0.0, stage=3)
    info_nce = InfoNCE(temperature=TAU, gather=True)
    GradCache([model, model], backward=engine.backward, sync=grad_sync(engine)).step(
        [list(q.split(CHUNK)), list(c.split(CHUNK))], lambda a, b: (info_nce(a, b).loss, {}))
    out["zero3"] = _full_grads(model)
    return out


def _steps(rank, world, p):
    q, c = (x.float()[rank * B // world:(rank + 1) * B // world] for x in make_data())
    chunks = [list(q.split(CHUNK)), list(c.split(CHUNK))]
    info_nce = InfoNCE(temperature=TAU, gather=True)

    def loss_fn(a, b):
        return info_nce(a, b).loss, {}

    out = {}
    # the ordinary DeepSpeed step: autograd through every chunk's forward, one engine.backward
    engine, model = _engine(p)
    torch.manual_seed(100 + rank)
    engine.backward(info_nce(torch.cat([model(x) for x in chunks[0]]), torch.cat([model(x) for x in chunks[1]])).loss)
    out["plain"] = _full_grads(model)
    engine.step()
    out["plain_params"] = _params(model)

    # GradCache with the engine's backward and the sync chosen from the engine
    engine, model = _engine(p)
    sync = grad_sync(engine)
    assert isinstance(sync, CoalescedSync)
    torch.manual_seed(100 + rank)
    GradCache([model, model], backward=engine.backward, sync=sync).step(chunks, loss_fn)
    out["gradcache"] = _full_grads(model)
    engine.step()
    out["gradcache_params"] = _params(model)

    # naive: one engine.backward per chunk, no coalescing (the loss backward kept off the engine, since through
    # it DeepSpeed fails outright: the reduce epilogue finds no bucket, IndexError)
    engine, model = _engine(p)
    torch.manual_seed(100 + rank)
    naive = GradCache([model, model], backward=engine.backward)
    cached = naive.cache(chunks)
    leaves = cached.leaves()
    naive.replay(chunks, cached, torch.autograd.grad(loss_fn(*leaves)[0], leaves))
    out["naive"] = _full_grads(model)
    engine.step()
    out["initial_params"] = _params(make_tower(p).float())
    return out


def _assert_close(a: dict, b: dict, **tol):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name, **tol)


def _max_diff(a: dict, b: dict) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.fixture(scope="module")
def per_rank():
    """One spawn of 2 processes for both tests (DeepSpeed's start-up dominates their time)."""
    return run_distributed(_under_zero2, 2, timeout_s=300)


def test_gradcache_under_zero2_gives_the_full_batch_step(per_rank):
    """No dropout: GradCache's gradients under ZeRO-2 equal one process's gradient on the whole global batch,
    and the SGD update applies exactly them; one engine.backward per chunk gets them wrong."""
    model = make_tower(0.0).float()
    q, c = (x.float() for x in make_data())
    plain_loss(model(q), model(c)).backward()
    full = {n: p.grad for n, p in model.named_parameters()}
    for out in (rank[0.0] for rank in per_rank):
        _assert_close(out["plain"], full, **TIGHT)  # the engine and the gathered loss are set up right
        _assert_close(out["gradcache"], full, **TIGHT)
        _assert_close(out["gradcache_params"], {n: out["initial_params"][n] - LR * full[n] for n in full}, **TIGHT)
        # regression guard: the per-chunk reductions of naive multi-backward ZeRO-2 lose gradient
        assert _max_diff(out["naive"], full) > 1e-2
    for out in per_rank:  # the same coalesced reduction under ZeRO-3 (parameters partitioned too)
        _assert_close(out["zero3"], full, **TIGHT)


def test_gradcache_under_zero2_with_dropout_gives_the_plain_deepspeed_step(per_rank):
    """Dropout on: the replayed masks are the cache pass's, so GradCache == the ordinary ZeRO-2 step over the same
    chunks and RNG seeds, in gradients and in updated parameters, on both ranks."""
    for out in (rank[0.5] for rank in per_rank):
        _assert_close(out["gradcache"], out["plain"], **TIGHT)
        _assert_close(out["gradcache_params"], out["plain_params"], **TIGHT)
        assert _max_diff(out["naive"], out["plain"]) > 1e-2
    # ZeRO-2 all-gathers the updated partitions: both ranks hold the same parameters
    _assert_close(per_rank[0][0.5]["gradcache_params"], per_rank[1][0.5]["gradcache_params"], rtol=0, atol=0)
