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
   back-propagated. Gradients accumulate over chunks; DDP synchronises only on the last chunk.

The result equals the gradient of the loss on the whole batch encoded in these chunks (tests/test_gradcache.py).
Peak activation memory is that of one chunk plus the ``[B, D]`` representations.
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


class GradCache:
    """The three stages of a GradCache step over input groups that were already cut into chunks.

    Args:
        encoders: one function per group, mapping a chunk's inputs to its ``[b, D]`` representations (e.g.
            ``module.encode_query`` and ``module.encode_candidate``).
        backward: how to back-propagate a scalar (``LightningModule.manual_backward`` under Lightning, so that
            precision plugins and DDP's reducer see it); default ``Tensor.backward``.
        no_sync: a context-manager factory that suspends DDP gradient synchronisation (Lightning:
            ``trainer.strategy.block_backward_sync``; plain DDP: ``ddp_model.no_sync``). Entered for every
            backward except the last chunk's, so gradients are all-reduced once per step. None = no DDP.
    """

    def __init__(self, encoders: Sequence[Callable[[Any], Tensor]],
                 backward: Callable[[Tensor], None] | None = None,
                 no_sync: Callable[[], contextlib.AbstractContextManager] | None = None):
        self.encoders = list(encoders)
        self.backward = backward or Tensor.backward
        self.no_sync = no_sync or contextlib.nullcontext

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
        """Stage 2: back-propagate ``loss`` (computed on ``leaves``) and return ``d loss / d leaf`` per group.

        Parameters the loss itself owns (a learnable temperature) receive their gradient here, unsynchronised;
        under DDP such a loss needs ``find_unused_parameters`` since the replay does not touch them.
        """
        with self.no_sync():
            self.backward(loss)
        return [leaf.grad for leaf in leaves]

    def replay(self, chunks: Sequence[Sequence[Any]], cached: CachedReps, grads: Sequence[Tensor]) -> None:
        """Stage 3: re-encode every chunk with its RNG state and back-propagate its slice of the cached gradient."""
        last = (len(chunks) - 1, len(chunks[-1]) - 1)
        for g, (encode, group) in enumerate(zip(self.encoders, chunks)):
            sizes = [r.shape[0] for r in cached.reps[g]]
            for c, (chunk, grad) in enumerate(zip(group, grads[g].split(sizes))):
                sync = contextlib.nullcontext() if (g, c) == last else self.no_sync()
                with sync:
                    with cached.rng[g][c].replay():
                        rep = encode(chunk)
                    # d(rep . grad)/d params = grad^T d rep/d params: the chain rule through the cached leaf
                    self.backward((rep * grad.to(rep.dtype)).sum())

    def step(self, chunks: Sequence[Sequence[Any]], loss_fn: Callable[..., tuple[Tensor, dict[str, Tensor]]]
             ) -> tuple[Tensor, dict[str, Tensor]]:
        """All three stages; ``loss_fn(*group_reps)`` returns ``(loss, terms)``. Returns them detached."""
        cached = self.cache(chunks)
        leaves = cached.leaves()
        loss, terms = loss_fn(*leaves)
        grads = self.rep_grads(loss, leaves)
        self.replay(chunks, cached, grads)
        return loss.detach(), terms
