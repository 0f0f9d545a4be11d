"""VLMo (Bao et al., 2022) as a LightningModule: stagewise pretraining, retrieval and VQA/NLVR2 fine-tuning.

Stages (``stage`` in the config; official ``run.py`` task configs):

- ``text_mlm``: stage 2, text-only MLM with L-FFN in every layer (the VL-FFN is not used).
- ``vl_pretrain``: stage 3, ITC on the expert CLS and the VL-FFN CLS, ITM with hard negatives drawn from the
  gathered ITC similarities, MLM on the joint encoding (official weights 1, 1, 0.25).
- ``irtr``: retrieval fine-tuning, ITC on the V-FFN / L-FFN CLS only (dual encoder).
- ``vqa``: soft-score BCE over the answer vocabulary from the pooled joint CLS.
- ``nlvr2``: two joint passes (image token types 1 and 2), concatenated pooled CLS -> 2 classes.

Freezing is explicit config: ``parameter_groups`` names lists of parameter paths (``*`` stands for one path
component, a path covers everything below it) and ``trainable`` lists the groups that train (``null`` = all).
A pattern that matches no parameter is an error, so a renamed module cannot silently unfreeze or freeze.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch
import torch.nn.functional as F

from unimm.losses import gather_no_grad, world_info
from unimm.losses.vlmo import (
    VLMoContrastive,
    itm_loss,
    mlm_loss,
    sample_hard_negatives,
    vqa_loss,
    vqa_targets,
)
from unimm.methods.base import EmbeddingModule
from unimm.models.vlmo import VLMo
from unimm.training.optim import weight_decay_groups

STAGES = ("text_mlm", "vl_pretrain", "irtr", "vqa", "nlvr2")
DEFAULT_WEIGHTS = {"itc": 1.0, "itm": 1.0, "mlm": 0.25}


def path_matches(pattern: str, name: str) -> bool:
    """True when the dotted ``pattern`` (``*`` = one component) matches ``name`` or a prefix of its components."""
    pat, parts = pattern.split("."), name.split(".")
    return len(pat) <= len(parts) and all(fnmatchcase(n, p) for p, n in zip(pat, parts))


def resolve_groups(names: Sequence[str], groups: Mapping[str, Sequence[str]]) -> dict[str, set[str]]:
    """``{group: {parameter names}}``; raises naming every pattern that matches no parameter."""
    out, unmatched = {}, []
    for group, patterns in groups.items():
        out[group] = set()
        for pattern in patterns:
            hit = {n for n in names if path_matches(pattern, n)}
            if not hit:
                unmatched.append(f"{group}: {pattern}")
            out[group] |= hit
    if unmatched:
        raise ValueError(f"parameter group patterns match no parameter: {unmatched}")
    return out


class VLMoModule(EmbeddingModule):
    """VLMo training and embedding.

    Args:
        encoder: the :class:`~unimm.models.vlmo.VLMo` network (with its heads).
        optimizer, scheduler, on_nonfinite_loss: see :class:`~unimm.methods.base.EmbeddingModule`.
        stage: one of :data:`STAGES`.
        loss_weights: ``itc``/``itm``/``mlm`` weights of ``vl_pretrain`` (0 disables a term); ``mlm`` is also the
            weight of ``text_mlm`` (official: 1.0 there).
        contrastive: the ITC loss (default: gathered across ranks).
        parameter_groups: named lists of parameter paths (relative to ``encoder``).
        trainable: the groups that train; ``None`` = every parameter.
        lr_mult: learning-rate multiplier per group (official: heads x ``lr_mult``, e.g. 20 for VQA).
        retrieval_cls: embedding for retrieval: ``expert`` (V-FFN / L-FFN CLS, the dual encoder of ``irtr``) or
            ``vl`` (the VL-FFN CLS rerun, with the vl projections).
        itm_seed: seed of the hard-negative draw (``None`` = torch's global RNG).
    """

    def __init__(self, encoder: VLMo, optimizer, scheduler=None, stage: str = "vl_pretrain",
                 loss_weights: Mapping[str, float] | None = None, contrastive: VLMoContrastive | None = None,
                 parameter_groups: Mapping[str, Sequence[str]] | None = None, trainable: Sequence[str] | None = None,
                 lr_mult: Mapping[str, float] | None = None, retrieval_cls: str = "expert",
                 itm_seed: int | None = None, on_nonfinite_loss: str = "skip", compile: bool | dict = False):
        super().__init__(optimizer, scheduler, on_nonfinite_loss, compile)
        if stage not in STAGES:
            raise ValueError(f"stage={stage!r}; valid: {STAGES}")
        if retrieval_cls not in ("expert", "vl"):
            raise ValueError(f"retrieval_cls={retrieval_cls!r}; valid: expert, vl")
        self.encoder = encoder
        self.stage = stage
        self.weights = {**DEFAULT_WEIGHTS, **(loss_weights or {})}
        self.contrastive = contrastive or VLMoContrastive()
        self.retrieval_cls = retrieval_cls
        self.itm_generator = None if itm_seed is None else torch.Generator().manual_seed(itm_seed)
        names = [n for n, _ in encoder.named_parameters()]
        self.groups = resolve_groups(names, parameter_groups or {})
        unknown = [g for g in [*(trainable or []), *(lr_mult or {})] if g not in self.groups]
        if unknown:
            raise ValueError(f"unknown parameter group(s) {unknown}; defined: {sorted(self.groups)}")
        self.lr_mult = dict(lr_mult or {})
        if trainable is not None:
            keep = set().union(*(self.groups[g] for g in trainable))
            for name, p in encoder.named_parameters():
                p.requires_grad_(name in keep)

    # -- embeddings for retrieval ----------------------------------------------------------------------------
    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` L2-normalised text embedding (``retrieval_cls`` decides which CLS)."""
        itc = self.encoder.heads.itc
        if self.retrieval_cls == "vl":
            return F.normalize(itc.vl_text(self.encoder.encode_text(input_ids, attention_mask).vl_hidden[:, 0]), dim=-1)
        return F.normalize(itc.text(self.encoder.encode_text(input_ids, attention_mask, vl=False).hidden[:, 0]), dim=-1)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` L2-normalised image embedding."""
        itc = self.encoder.heads.itc
        if self.retrieval_cls == "vl":
            return F.normalize(itc.vl_image(self.encoder.encode_image(pixel_values).vl_hidden[:, 0]), dim=-1)
        return F.normalize(itc.image(self.encoder.encode_image(pixel_values, vl=False).hidden[:, 0]), dim=-1)

    def embed(self, side: dict[str, Any]) -> torch.Tensor:
        """Text rows through the text path, image rows through the image path: ``[B, D]``.

        VLMo retrieval is a dual encoder: a row with both text and image has no embedding (use the joint
        encoding with ITM re-ranking instead), so it is an error.
        """
        both = set(side["text_rows"].tolist()) & set(side["image_rows"].tolist())
        if both:
            raise ValueError(f"VLMo embeds text or image, not both: rows {sorted(both)[:5]} have both; "
                             "restrict eval.evaluations to text->image and image->text evaluations")
        out = torch.zeros(side["size"], self.encoder.config.hidden_size, device=self.device)
        if len(side["text_rows"]):
            out = out.index_copy(0, side["text_rows"], self.text_features(side["input_ids"], side["attention_mask"]).float())
        if len(side["image_rows"]):
            out = out.index_copy(0, side["image_rows"], self.image_features(side["pixel_values"]).float())
        return out

    def encode_query(self, side: dict[str, Any]) -> torch.Tensor:
        return self.embed(side)

    def encode_candidate(self, side: dict[str, Any]) -> torch.Tensor:
        return self.embed(side)

    # -- task heads ------------------------------------------------------------------------------------------
    def _joint_rows(self, side: dict[str, Any]) -> None:
        if side["text_rows"].tolist() != side["image_rows"].tolist() or len(side["text_rows"]) != side["size"]:
            raise ValueError("VQA/NLVR2 need text and image on every row")

    def vqa_logits(self, side: dict[str, Any]) -> torch.Tensor:
        """``[B, answers]`` from the pooled joint CLS of (question, image) rows."""
        self._joint_rows(side)
        joint = self.encoder.encode_image_text(side["input_ids"], side["attention_mask"], side["pixel_values"])
        return self.encoder.heads.vqa(self.encoder.heads.pooler(joint))

    def itm_score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B]`` ITM logit of class "match" for (text ``[B, T]``, image ``[B, 3, H, W]``) pairs (retrieval re-ranking)."""
        joint = self.encoder.encode_image_text(input_ids, attention_mask, pixel_values)
        return self.encoder.heads.itm(self.encoder.heads.pooler(joint))[:, 1]

    def nlvr2_logits(self, side: dict[str, Any], second: dict[str, Any]) -> torch.Tensor:
        """``[B, 2]``: (sentence, image 0) with image token type 1 and (sentence, image 1) with type 2."""
        self._joint_rows(side)
        ids, mask = side["input_ids"], side["attention_mask"]
        first = self.encoder.heads.pooler(self.encoder.encode_image_text(ids, mask, side["pixel_values"], image_token_type=1))
        other = self.encoder.heads.pooler(self.encoder.encode_image_text(ids, mask, second["pixel_values"], image_token_type=2))
        return self.encoder.heads.nlvr2(torch.cat([first, other], dim=-1))

    # -- losses ----------------------------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, terms = getattr(self, f"_loss_{self.stage}")(batch)
        if "unpaired" in batch:
            terms["unpaired"] = float(batch["unpaired"])
        return loss, terms

    def _loss_text_mlm(self, batch):
        text = batch["text"]
        hidden = self.encoder.encode_text(text["mlm_input_ids"], text["attention_mask"], vl=False).hidden
        loss, acc = mlm_loss(self.encoder.heads.mlm(hidden), text["mlm_labels"])
        return self.weights["mlm"] * loss, {"mlm": loss.detach(), "mlm_accuracy": acc}

    def _itc(self, pairs, vl: bool):
        itc = self.encoder.heads.itc
        image = self.encoder.encode_image(pairs["pixel_values"], vl=vl)
        text = self.encoder.encode_text(pairs["input_ids"], pairs["attention_mask"], vl=vl)
        f_i = F.normalize(itc.image(image.hidden[:, 0]), dim=-1)
        f_t = F.normalize(itc.text(text.hidden[:, 0]), dim=-1)
        if image.vl_hidden is None:
            return self.contrastive(f_i, f_t, itc.logit_scale), f_i, f_t
        f_ivl = F.normalize(itc.vl_image(image.vl_hidden[:, 0]), dim=-1)
        f_tvl = F.normalize(itc.vl_text(text.vl_hidden[:, 0]), dim=-1)
        return self.contrastive(f_i, f_t, itc.logit_scale, f_ivl, f_tvl, itc.logit_vl_scale), f_i, f_t

    def _loss_irtr(self, batch):
        out, _, _ = self._itc(batch["pairs"], vl=False)
        return out.loss, out.terms

    def _loss_vl_pretrain(self, batch):
        pairs = batch["pairs"]
        out, f_i, f_t = self._itc(pairs, vl=True)
        loss = self.weights["itc"] * out.loss
        terms = dict(out.terms)
        if self.weights["itm"]:
            itm, acc = self._itm(pairs, f_i, f_t)
            loss = loss + self.weights["itm"] * itm
            terms.update(itm=itm.detach(), itm_accuracy=acc)
        if self.weights["mlm"]:
            t = pairs["input_ids"].shape[1]
            joint = self.encoder.encode_image_text(pairs["mlm_input_ids"], pairs["attention_mask"], pairs["pixel_values"])
            mlm, acc = mlm_loss(self.encoder.heads.mlm(joint[:, :t]), pairs["mlm_labels"])
            loss = loss + self.weights["mlm"] * mlm
            terms.update(mlm=mlm.detach(), mlm_accuracy=acc)
        return loss, terms

    def _itm(self, pairs, f_i: torch.Tensor, f_t: torch.Tensor):
        """ITM on B positives, B (text, hard negative image) and B (hard negative text, image) pairs."""
        rank, _ = world_info()
        b = f_i.shape[0]
        scale = self.encoder.heads.itc.logit_scale.exp().detach()
        with torch.no_grad():
            all_i, all_t = gather_no_grad(f_i), gather_no_grad(f_t)
            neg_image = sample_hard_negatives(scale * f_t @ all_i.T, rank * b, self.itm_generator)  # per text
            neg_text = sample_hard_negatives(scale * f_i @ all_t.T, rank * b, self.itm_generator)  # per image
            all_px = gather_no_grad(pairs["pixel_values"])
            all_ids, all_mask = gather_no_grad(pairs["input_ids"]), gather_no_grad(pairs["attention_mask"])
        ids = torch.cat([pairs["input_ids"], pairs["input_ids"], all_ids[neg_text]])
        mask = torch.cat([pairs["attention_mask"], pairs["attention_mask"], all_mask[neg_text]])
        px = torch.cat([pairs["pixel_values"], all_px[neg_image], pairs["pixel_values"]])
        pooled = self.encoder.heads.pooler(self.encoder.encode_image_text(ids, mask, px))
        return itm_loss(self.encoder.heads.itm(pooled), b)

    def _loss_vqa(self, batch):
        logits = self.vqa_logits(batch["query"])
        meta = batch["meta"]
        targets = vqa_targets([m["answer_labels"] for m in meta], [m["answer_scores"] for m in meta],
                              logits.shape[1], device=logits.device)
        loss = vqa_loss(logits, targets)
        score = targets.gather(1, logits.argmax(1, keepdim=True)).mean()
        return loss, {"vqa_score": score.detach()}

    def _loss_nlvr2(self, batch):
        logits = self.nlvr2_logits(batch["query"], batch["image1"])
        labels = torch.tensor([int(m["label"]) for m in batch["meta"]], device=logits.device)
        loss = F.cross_entropy(logits.float(), labels)
        return loss, {"nlvr2_accuracy": (logits.argmax(1) == labels).float().mean().detach()}

    # -- optimizer: per-group learning-rate multipliers ---------------------------------------------------------
    def configure_optimizers(self):
        if not self.lr_mult:
            return super().configure_optimizers()
        keywords = getattr(self.optimizer_factory, "keywords", {})
        base_lr, weight_decay = keywords["lr"], keywords.get("weight_decay", 0.0)
        mult_of = {}
        for group, mult in self.lr_mult.items():
            for name in self.groups[group]:
                mult_of.setdefault(f"encoder.{name}", mult)
        by_mult: dict[float, list] = {}
        for name, p in self.named_parameters():
            by_mult.setdefault(mult_of.get(name, 1.0), []).append((name, p))
        param_groups = []
        for mult, named in by_mult.items():
            for g in weight_decay_groups(named, weight_decay):
                if g["params"]:
                    param_groups.append({**g, "lr": base_lr * mult})
        optimizer = self.optimizer_factory(param_groups)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
