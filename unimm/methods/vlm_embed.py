"""VLM embedders: VLM2Vec, UniMoCo and E5-V as one LightningModule; the variants are config.

- **VLM2Vec** (Jiang et al. 2024): a VLM backbone (:mod:`unimm.models.vlm.adapters`, LoRA/DoRA optional), the
  embedding is the last layer's hidden state at the last real token, L2-normalised; InfoNCE query -> candidate at
  a fixed temperature of 0.02, candidates gathered across ranks (:class:`~unimm.losses.InfoNCE`).
- **E5-V** style: the same module with one-word summary prompt templates in the collator
  (``conf/experiment/e5v_*.yaml``); zero-shot (no training) or trained on text-only NLI triplets: the batch's
  ``neg.N`` sides are each query's own hard negatives in the InfoNCE denominator (E5-V puts every hard negative
  of the global batch there; ours keeps the one loss of unimm, see experiments/unimoco/README.md).
- **UniMoCo**: with a ``completion`` module (:mod:`unimm.models.vlm.unimoco`) every input without an image gets
  pseudo-visual tokens, at training and at inference. The official loss is not public; ours (a documented choice):

      loss = contrastive_weight * InfoNCE(q, c)                       (inputs completed where an image is missing)
           + alignment_weight * mean(1 - cos(e(T+I), e(T + completed)))   (rows that have both, image dropped)

  The alignment pulls the embedding of a text with its pseudo-image towards the one with its real image, on both
  sides of the batch; the collator builds the image-dropped copies (``drop_image``/``drop_rows``).
- **GradCache** (``gradcache: true``): manual optimisation; each side is encoded chunk by chunk
  (:class:`~unimm.training.gradcache.GradCache`), gradients reduced once per step (DDP: on the last chunk;
  DeepSpeed ZeRO: one coalesced reduction, see :func:`~unimm.training.gradcache.grad_sync`). Chunks come from
  the collator (``chunk_size``), so GradCache and the plain step see the same chunking.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from unimm.checkpoints.io import load_checkpoint
from unimm.losses import InfoNCE
from unimm.methods.base import EmbeddingModule
from unimm.models.vlm.lora import LoraSpec, apply_lora
from unimm.models.vlm.pooling import last_token_pool
from unimm.training.gradcache import GradCache, grad_sync
from unimm.utils.batches import to_device


class VLMEmbedModule(EmbeddingModule):
    """VLM2Vec / UniMoCo / E5-V.

    Args:
        encoder: the backbone, a :class:`~unimm.models.vlm.adapters.VLMBackbone` (Qwen2-VL, LLaVA-NeXT, Phi-3.5-V).
        loss: ``InfoNCE`` (VLM2Vec: ``temperature=0.02, symmetric=False, gather=True``).
        optimizer, scheduler, on_nonfinite_loss: see :class:`~unimm.methods.base.EmbeddingModule`.
        lora: a :class:`~unimm.models.vlm.lora.LoraSpec` (or its fields as a dict); None = full fine-tuning.
        completion: a partial ``backbone -> ModalityCompletion`` (UniMoCo); built before LoRA wraps the backbone,
            so it copies the original image tower. None = VLM2Vec / E5-V.
        contrastive_weight, alignment_weight: UniMoCo's loss weights (see the module docstring).
        gradcache: train with GradCache (manual optimisation).
        gradient_checkpointing: recompute the backbone's activations in backward (transformers' own switch).
        init_from: a Lightning checkpoint of the same configuration whose weights start this run (a second
            training stage, e.g. E5-V-style VQA after image-text pairs); optimizer state is not taken.
    """

    def __init__(self, encoder: nn.Module, loss: InfoNCE, optimizer, scheduler=None, on_nonfinite_loss: str = "skip",
                 compile: bool | dict = False,
                 lora: LoraSpec | dict | None = None, completion: Callable[[nn.Module], nn.Module] | None = None,
                 contrastive_weight: float = 1.0, alignment_weight: float = 1.0, gradcache: bool = False,
                 gradient_checkpointing: bool = False, init_from: str | None = None):
        super().__init__(optimizer, scheduler, on_nonfinite_loss, compile)
        backbone = encoder
        self.completion = completion(backbone) if completion is not None else None
        if gradient_checkpointing:
            backbone.model.gradient_checkpointing_enable()
        if lora is not None:
            backbone = apply_lora(backbone, lora if isinstance(lora, LoraSpec) else LoraSpec(**lora))
        self.backbone = backbone
        self.loss = loss
        self.contrastive_weight = contrastive_weight
        self.alignment_weight = alignment_weight
        self.gradcache = gradcache
        self.automatic_optimization = not gradcache
        if init_from:
            self.load_state_dict(load_checkpoint(init_from)["state_dict"])  # strict: same architecture

    # -- embeddings ----------------------------------------------------------------------------------------------
    def embed_chunk(self, chunk: dict[str, Any]) -> Tensor:
        """One chunk of adapter inputs -> ``[b, H]`` L2-normalised last-token embeddings."""
        chunk = to_device(chunk, self.device)
        embeds = None
        if "completion_mask" in chunk:
            if self.completion is None:
                raise ValueError("the batch has completion slots but the module has no completion module")
            embeds = self.completion.fill(self.backbone, chunk)
        hidden = self.backbone(chunk, inputs_embeds=embeds)
        return last_token_pool(hidden, chunk["attention_mask"].to(hidden.device))

    def embed(self, side: dict[str, Any]) -> Tensor:
        """A collated side (``{"size", "chunks"}``) -> ``[B, H]``: its chunks' embeddings, concatenated."""
        return torch.cat([self.embed_chunk(c) for c in side["chunks"]])

    def encode_query(self, side: dict[str, Any]) -> Tensor:
        return self.embed(side)

    def encode_candidate(self, side: dict[str, Any]) -> Tensor:
        return self.embed(side)

    # -- loss ----------------------------------------------------------------------------------------------------
    def _groups(self, batch: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
        """The chunk lists to encode, by name: query, pos, hard negatives ``neg.N`` (E5-V NLI) and (UniMoCo)
        the image-dropped copies ``query_drop``, ``pos_drop``."""
        groups = {"query": batch["query"]["chunks"], "pos": batch["pos"]["chunks"]}
        groups.update({side: batch[side]["chunks"] for side in sorted(batch) if side.startswith("neg.")})
        if self.completion is not None:
            if "drop_image" not in batch["query"]:
                raise ValueError("UniMoCo training needs the collator's completion_tokens > 0 (the alignment pairs)")
            groups.update(query_drop=batch["query"]["drop_image"], pos_drop=batch["pos"]["drop_image"])
        return groups

    def loss_from_reps(self, batch: dict[str, Any], reps: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss on embeddings ``{group: [n, H]}`` (shared by the plain step and GradCache's cached reps)."""
        negs = [reps[name] for name in reps if name.startswith("neg.")]
        hard = torch.stack(negs, dim=1) if negs else None  # [B, N, H]: each query's own negatives
        out = self.loss(reps["query"], reps["pos"], hard_negatives=hard)
        terms = {"accuracy": out.accuracy}
        if self.completion is None:
            return out.loss, terms
        align = []
        for side in ("query", "pos"):
            rows = batch[side]["drop_rows"].to(reps[side].device)
            if rows.numel():  # both L2-normalised: 1 - cosine
                align.append(1 - (reps[side][rows] * reps[f"{side}_drop"]).sum(-1))
        alignment = torch.cat(align).mean() if align else reps["query"].sum() * 0
        terms.update(contrastive=out.loss.detach(), alignment=alignment.detach())
        return self.contrastive_weight * out.loss + self.alignment_weight * alignment, terms

    def compute_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        reps = {name: torch.cat([self.embed_chunk(c) for c in chunks]) if chunks else self._empty()
                for name, chunks in self._groups(batch).items()}
        return self.loss_from_reps(batch, reps)

    def _empty(self) -> Tensor:
        return torch.zeros(0, self.backbone.hidden_size, device=self.device)

    # -- GradCache: manual optimisation ---------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int):
        if not self.gradcache:
            return super().training_step(batch, batch_idx)
        optimizer = self.optimizers()
        # from what the strategy's model can do: a DeepSpeed engine coalesces its reduction; Lightning's DDP
        # strategies suspend sync with block_backward_sync; single-device has neither
        strategy = self.trainer.strategy
        sync = grad_sync(strategy.model, getattr(strategy, "block_backward_sync", None))
        groups = self._groups(batch)
        present = [name for name, chunks in groups.items() if chunks]  # an image-dropped group may be empty
        cache = GradCache([self.embed_chunk] * len(present), backward=self.manual_backward, sync=sync)
        cached = cache.cache([groups[name] for name in present])
        leaves = cached.leaves()
        reps = {name: self._empty() for name in groups}
        reps.update(zip(present, leaves))
        loss, terms = self.loss_from_reps(batch, reps)
        size = len(batch["keys"])
        if not self._all_ranks_finite(loss):
            self.skip_nonfinite(loss, batch)  # raises under on_nonfinite_loss=stop
            return None
        cache.backward_step([groups[name] for name in present], cached, loss, leaves)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=size)
        for name, value in terms.items():
            self.log(f"train/{name}", value, batch_size=size)
        self.log("train/lr", optimizer.param_groups[0]["lr"], batch_size=size)
        return loss.detach()
