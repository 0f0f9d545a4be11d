"""GradCache (Gao et al. 2021): a contrastive step over a large batch in the memory of one chunk.

The loss of an in-batch contrastive objective couples every row with every other, so the batch cannot simply be
split into gradient-accumulation steps. GradCache splits it anyway, in three stages:

1. **cache**: every chunk of every input group (queries, candidates...) is encoded without a graph; the RNG state
   before each chunk is kept.
2. **loss**: the concatenated representations become leaves; the loss (gathered across ranks by the loss itself)
   is back-propagated to them, giving ``d loss / d rep`` for every row (and the gradients of any parameters the
   loss owns).
3. **replay**: each chunk is encoded again with a graph, with its RNG state restored (dropout draws the same
   masks as in stage 1, so the cached gradient belongs to this very forward), and ``rep . cached_grad`` is
   back-propagated. Gradients accumulate over chunks.

Stages 2 and 3 make several backward passes for one optimizer step; how they meet data-parallel gradient reduction
is a :class:`GradSync`, chosen by :func:`grad_sync` from what the training model can do (no strategy names):

- one process: nothing to do;
- DDP: every backward but the last runs under ``no_sync``, so gradients are all-reduced once (on the last chunk);
- DeepSpeed ZeRO 1/2/3: the whole backward phase runs under ``engine.coalesce_grad_reduction()``: gradients
  accumulate locally and are reduced (and, ZeRO-2/3, partitioned) once when it exits; ``engine.step()`` follows.
  The naive ways fail under ZeRO-2 (deepspeed 0.19.8): ``engine.backward`` of the loss alone reaches no parameter
  and DeepSpeed's reduce epilogue finds no bucket (IndexError); one ``engine.backward`` per chunk, each reducing
  on its own, silently gives wrong gradients (a regression guard in tests/test_gradcache_zero2.py). This is what
  kept VLM2Vec off DeepSpeed (VLM2Vec #70).

The cached gradients are the *unscaled* ``d loss / d rep`` (``torch.autograd.grad``); whatever the strategy's
backward multiplies a loss by (a GradScaler / DeepSpeed loss scale, DeepSpeed's ``1 / gradient_accumulation_steps``)
is then applied exactly once, by the replay's backward, as for the loss-owned parameters in stage 2.

The result equals the gradient of the loss on the whole batch encoded in these chunks (tests/test_gradcache.py,
tests/test_gradcache_zero2.py). Peak activation memory is that of one chunk plus the ``[B, D]`` representations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class RNGState:
    """The CPU and CUDA generator states at one moment; :meth:`replay` restores them inside a fork."""

    cpu: Tensor
    cuda: list[Tensor] = field(default_factory=list)

    @classmethod
    def capture(cls) -> RNGState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        return cls(torch.get_rng_state(), cuda)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the body with these states; afterwards the global generators continue as if it never ran."""
        devices = list(range(len(self.cuda)))
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.set_rng_state(self.cpu)
            if self.cuda:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


@dataclass
class CachedReps:
    """Stage 1's output: per group, the chunk representations (no graph) and the RNG state of each chunk."""

    reps: list[list[Tensor]]
    rng: list[list[RNGState]]

    def leaves(self) -> list[Tensor]:
        """One ``[B_group, D]`` leaf tensor per group, requiring grad: the loss is computed on these."""
        return [torch.cat(chunks).detach().requires_grad_() for chunks in self.reps]


class GradSync:
    """How the backward passes of one GradCache step meet data-parallel gradient reduction; this base: not at all
    (one process, or a strategy that accumulates sharded gradients over backwards by itself)."""

    def step(self) -> contextlib.AbstractContextManager:
        """Entered once around all backward passes of a step (stages 2 and 3); the optimizer steps after it."""
        return contextlib.nullcontext()

    def deferred(self) -> contextlib.AbstractContextManager:
        """Entered around every backward pass of the step but the last."""
        return contextlib.nullcontext()


class SyncOnLast(GradSync):
    """DDP: ``no_sync`` for every backward but the last, whose backward all-reduces the accumulated gradients.

    Args:
        no_sync: the context-manager factory (plain DDP: ``ddp_model.no_sync``; Lightning:
            ``trainer.strategy.block_backward_sync``, which is DDP's ``no_sync`` or nothing).
    """

    def __init__(self, no_sync: Callable[[], contextlib.AbstractContextManager]):
        self.no_sync = no_sync

    def deferred(self) -> contextlib.AbstractContextManager:
        return self.no_sync()


class CoalescedSync(GradSync):
    """DeepSpeed ZeRO 1/2/3: the step's backwards accumulate gradients locally; one reduction when the step's
    context exits (``engine.coalesce_grad_reduction``; ``engine.step()`` must come after it)."""

    def __init__(self, engine: Any):
        self.engine = engine

    def step(self) -> contextlib.AbstractContextManager:
        return self.engine.coalesce_grad_reduction()


def grad_sync(model: Any, no_sync: Callable[[], contextlib.AbstractContextManager] | None = None) -> GradSync:
    """The :class:`GradSync` for ``model``, the wrapped training model (Lightning: ``trainer.strategy.model``).

    A model that can coalesce gradient reduction (a DeepSpeed engine) coalesces; otherwise ``no_sync``, if given,
    defers DDP's all-reduce to the last backward; otherwise nothing.
    """
    if hasattr(model, "coalesce_grad_reduction"):
        return CoalescedSync(model)
    if hasattr(model, "zero_optimization_partition_gradients"):  # a DeepSpeed engine from before the API
        raise RuntimeError("GradCache under DeepSpeed needs engine.coalesce_grad_reduction() "
                           "(DeepSpeed PR #7992; deepspeed 0.19.8 has it): upgrade deepspeed")
    return SyncOnLast(no_sync) if no_sync is not None else GradSync()


class GradCache:
    """The three stages of a GradCache step over input groups that were already cut into chunks.

    Args:
        encoders: one function per group, mapping a chunk's inputs to its ``[b, D]`` representations (e.g.
            ``module.encode_query`` and ``module.encode_candidate``).
        backward: how to back-propagate a scalar (``LightningModule.manual_backward`` under Lightning, so that
            precision plugins, DDP's reducer and DeepSpeed's engine see it; a bare engine: ``engine.backward``);
            default ``Tensor.backward``.
        sync: how the backwards meet gradient reduction (:func:`grad_sync`); default none (one process).
    """

    def __init__(self, encoders: Sequence[Callable[[Any], Tensor]],
                 backward: Callable[[Tensor], None] | None = None, sync: GradSync | None = None):
        self.encoders = list(encoders)
        self.backward = backward or Tensor.backward
        self.sync = sync or GradSync()

    def cache(self, chunks: Sequence[Sequence[Any]]) -> CachedReps:
        """Stage 1: ``chunks[g][c]`` is chunk ``c`` of group ``g``; encoded without a graph."""
        if len(chunks) != len(self.encoders):
            raise ValueError(f"{len(chunks)} input groups for {len(self.encoders)} encoders")
        reps, rng = [], []
        with torch.no_grad():
            for encode, group in zip(self.encoders, chunks):
                states, outs = [], []
                for chunk in group:
                    states.append(RNGState.capture())
                    outs.append(encode(chunk))
                reps.append(outs)
                rng.append(states)
        return CachedReps(reps, rng)

    def rep_grads(self, loss: Tensor, leaves: Sequence[Tensor]) -> list[Tensor]:
        """Stage 2: ``d loss / d leaf`` per group (``[B_group, D]``, unscaled), then ``backward(loss)``.

        The backward gives the parameters the loss itself owns (a learnable temperature) their gradient, scaled as
        the strategy scales every loss; under DDP such a loss needs ``find_unused_parameters`` since the replay
        does not touch them. Run inside :meth:`GradSync.step` (as :meth:`backward` does) under DeepSpeed.
        """
        grads = torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True, materialize_grads=True)
        with self.sync.deferred():
            self.backward(loss)
        return list(grads)

    def replay(self, chunks: Sequence[Sequence[Any]], cached: CachedReps, grads: Sequence[Tensor]) -> None:
        """Stage 3: re-encode every chunk with its RNG state and back-propagate its slice of the cached gradient."""
        last = (len(chunks) - 1, len(chunks[-1]) - 1)
        for g, (encode, group) in enumerate(zip(self.encoders, chunks)):
            sizes = [r.shape[0] for r in cached.reps[g]]
            for c, (chunk, grad) in enumerate(zip(group, grads[g].split(sizes))):
                sync = contextlib.nullcontext() if (g, c) == last else self.sync.deferred()
                with sync:
                    with cached.rng[g][c].replay():
                        rep = encode(chunk)
                    # d(rep . grad)/d params = grad^T d rep/d params: the chain rule through the cached leaf
                    self.backward((rep * grad.to(rep.dtype)).sum())

    def backward_step(self, chunks: Sequence[Sequence[Any]], cached: CachedReps, loss: Tensor,
                      leaves: Sequence[Tensor]) -> None:
        """Stages 2 and 3 inside the sync's step context: afterwards the gradients are ready for the optimizer."""
        with self.sync.step():
            self.replay(chunks, cached, self.rep_grads(loss, leaves))

    def step(self, chunks: Sequence[Sequence[Any]], loss_fn: Callable[..., tuple[Tensor, dict[str, Tensor]]]
             ) -> tuple[Tensor, dict[str, Tensor]]:
        """All three stages; ``loss_fn(*group_reps)`` returns ``(loss, terms)``. Returns them detached."""
        cached = self.cache(chunks)
        leaves = cached.leaves()
        loss, terms = loss_fn(*leaves)
        self.backward_step(chunks, cached, loss, leaves)
        return loss.detach(), terms
