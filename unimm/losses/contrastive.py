"""InfoNCE, the one contrastive loss every family uses.

Cross-rank semantics (open_clip local loss): each rank scores its ``B`` local queries against the
candidates of *all* ranks, a ``[B, world*B]`` block, with labels ``rank*B + arange(B)``; the
candidates are gathered with gradient (:func:`unimm.losses.distributed.gather_with_grad`). Each rank
takes the mean over its own rows and DDP averages gradients over ranks, so the update is the
gradient of ``mean_r(loss_r)``, which with equal ``B`` per rank is exactly the single-process loss on
the concatenated ``world*B`` batch: no ``world_size`` factor is needed. (VLM2Vec instead builds the
full ``[world*B, world*B]`` matrix on every rank and multiplies its loss by ``world_size`` to undo
DDP's averaging; the gradients are the same, at ``world`` times the logit compute.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unimm.losses.distributed import gather_with_grad, world_info


def _at_least_fp32(x: Tensor) -> Tensor:
    # Softmax in at least float32: a bf16/fp16 log-sum-exp over thousands of columns loses the
    # positive's margin. float64 stays float64.
    return x.to(torch.promote_types(x.dtype, torch.float32))


@dataclass
class ContrastiveOutput:
    """Result of a contrastive loss.

    Attributes:
        loss: scalar to backpropagate.
        logits: ``[B_local, B_global + N]`` query->candidate logits (scaled), detached, for logging;
            the last ``N`` columns are the row's own hard negatives.
        accuracy: scalar, top-1 accuracy of the local query rows (detached).
        terms: detached scalar per direction, e.g. ``{"q2c": ..., "c2q": ...}``, logged as
            ``train/<term>``.
    """

    loss: Tensor
    logits: Tensor
    accuracy: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)


class InfoNCE(nn.Module):
    """In-batch InfoNCE with cross-rank negatives and optional per-query hard negatives.

    Args:
        temperature: fixed temperature; the scale is ``1 / temperature`` unless ``logit_scale`` is
            passed to ``forward``. ``None`` requires ``logit_scale`` at every call.
        symmetric: also compute the candidate->query direction (local candidates vs gathered
            queries) and return ``(q2c + c2q) / 2`` (CLIP). ``False`` is query->candidate only
            (UniIR CLIP-SF, VLM2Vec).
        gather: use the candidates (and queries) of every rank as negatives. Identity when
            torch.distributed is not initialised. With ``gather=False`` each rank uses only its
            local batch.
        hard_negative_form: how ``hard_negatives`` enter the q2c direction.
            ``full_batch`` (default): the row's ``N`` own negatives are appended as columns to the
            full (gathered) in-batch matrix, ``[B, world*B + N]``.
            ``uniir``: UniIR's ``compute_inbatch_contrastive_loss`` with hard negatives: each query
            is scored against ``[its positive, its N own negatives, K "in-batch negatives"]``,
            nothing gathered, loss = mean of ``-log_softmax[:, 0]``; logits ``[B, 1 + N + K]``,
            ``K = min(B - 1, in_batch_neg_num)``. As in the official code, the K extra columns are
            copies of the row's *own* positive (UniIR expands ``p_embeds`` along the wrong dim before
            masking the diagonal), not other queries' positives.
            Without hard negatives both forms are the plain in-batch loss.
        in_batch_neg_num: K of the ``uniir`` form (UniIR's ``data_config.in_batch_neg_num``, 0 in
            every released config, where the quirk above has no effect).
    """

    HARD_NEGATIVE_FORMS = ("full_batch", "uniir")

    def __init__(self, temperature: float | None = 0.07, symmetric: bool = False, gather: bool = True,
                 hard_negative_form: str = "full_batch", in_batch_neg_num: int = 0):
        super().__init__()
        if hard_negative_form not in self.HARD_NEGATIVE_FORMS:
            raise ValueError(f"hard_negative_form={hard_negative_form!r}; valid: {list(self.HARD_NEGATIVE_FORMS)}")
        if in_batch_neg_num < 0:
            raise ValueError(f"in_batch_neg_num must be >= 0, got {in_batch_neg_num}")
        self.temperature = temperature
        self.symmetric = symmetric
        self.gather = gather
        self.hard_negative_form = hard_negative_form
        self.in_batch_neg_num = in_batch_neg_num

    def forward(
        self,
        query: Tensor,
        cand: Tensor,
        logit_scale: Tensor | None = None,
        hard_negatives: Tensor | None = None,
    ) -> ContrastiveOutput:
        """Computes the loss of this rank's rows.

        Embeddings are used as given: callers normalise them if the method needs cosine scores.

        Args:
            query: ``[B, D]`` local query embeddings; row ``i`` is paired with ``cand[i]``.
            cand: ``[B, D]`` local positive candidate embeddings.
            logit_scale: scalar tensor, already exponentiated (e.g. CLIP's ``logit_scale.exp()``);
                overrides ``temperature``. Not gathered: every rank holds the same parameter.
            hard_negatives: ``[B, N, D]`` extra negatives of each query, local to this rank; they
                add ``N`` columns to that query's row in the q2c direction only.

        Returns:
            ContrastiveOutput with ``logits`` of shape ``[B, world*B + N]``.

        Raises:
            ValueError: if no scale is available or the shapes do not match.
        """
        if logit_scale is None:
            if self.temperature is None:
                raise ValueError("InfoNCE needs a scale: pass logit_scale or set temperature")
            scale = 1.0 / self.temperature
        else:
            scale = logit_scale
        if query.ndim != 2 or query.shape != cand.shape:
            raise ValueError(
                f"query and cand must both be [B, D], got {tuple(query.shape)} and {tuple(cand.shape)}"
            )
        b = query.shape[0]
        if hard_negatives is not None and (
            hard_negatives.ndim != 3
            or hard_negatives.shape[0] != b
            or hard_negatives.shape[2] != query.shape[1]
        ):
            raise ValueError(
                f"hard_negatives must be [B, N, D] = [{b}, N, {query.shape[1]}], "
                f"got {tuple(hard_negatives.shape)}"
            )

        if hard_negatives is not None and self.hard_negative_form == "uniir":
            return self._uniir_hard_negative_loss(query, cand, hard_negatives, scale)

        rank = world_info()[0] if self.gather else 0
        all_cand = gather_with_grad(cand) if self.gather else cand
        # Rank r's positives sit at rows r*B..r*B+B-1 of the gathered candidates.
        labels = torch.arange(b, device=query.device) + rank * b

        logits = scale * query @ all_cand.T  # [B, world*B]
        if hard_negatives is not None:
            # q_i . neg_{i,n}: each query only sees its own negatives, appended as N columns.
            hn = scale * torch.einsum("bd,bnd->bn", query, hard_negatives)
            logits = torch.cat([logits, hn], dim=1)  # [B, world*B + N]
        q2c = F.cross_entropy(_at_least_fp32(logits), labels)
        terms = {"q2c": q2c}
        loss = q2c
        if self.symmetric:
            all_query = gather_with_grad(query) if self.gather else query
            logits_c2q = scale * cand @ all_query.T  # [B, world*B]; hard negatives are not queries
            c2q = F.cross_entropy(_at_least_fp32(logits_c2q), labels)
            terms["c2q"] = c2q
            loss = (q2c + c2q) / 2

        with torch.no_grad():
            accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return ContrastiveOutput(
            loss=loss,
            logits=logits.detach(),
            accuracy=accuracy,
            terms={k: v.detach() for k, v in terms.items()},
        )

    def _uniir_hard_negative_loss(self, query: Tensor, cand: Tensor, hard_negatives: Tensor, scale) -> ContrastiveOutput:
        """UniIR's hard-negative loss on local rows: ``[B, 1 + N + K]`` logits with the positive in column 0,
        ``K = min(B - 1, in_batch_neg_num)`` further columns scoring the row's own positive again (what
        UniIR's ``p_embeds.unsqueeze(1).expand(-1, bs, -1)[mask]`` selects). q2c only (``symmetric`` does not
        apply: UniIR has no c2q term here)."""
        b = query.shape[0]
        k = min(b - 1, self.in_batch_neg_num)
        negatives = torch.cat([hard_negatives, cand.unsqueeze(1).expand(-1, k, -1)], dim=1)  # [B, N + K, D]
        pos = (query * cand).sum(-1, keepdim=True)  # [B, 1]
        neg = (query.unsqueeze(1) * negatives).sum(-1)  # [B, N + K]
        logits = scale * torch.cat([pos, neg], dim=1)
        loss = -F.log_softmax(_at_least_fp32(logits), dim=1)[:, 0].mean()
        with torch.no_grad():
            accuracy = (logits.argmax(dim=1) == 0).float().mean()
        return ContrastiveOutput(loss=loss, logits=logits.detach(), accuracy=accuracy, terms={"q2c": loss.detach()})
