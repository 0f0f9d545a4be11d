"""Cluster discrimination losses against hand-computed values and a plain single-device reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unimm.losses.cluster import ArcFaceSoftmax, MultiLabelClusterLoss, PartialFC, arcface_cos, class_range


def test_arcface_target_logit_by_hand():
    cos = torch.tensor([0.5])  # theta = 60 degrees
    # cos(60 deg + 0.5 rad) = cos(1.5471976) = 0.0235966
    assert arcface_cos(cos, 0.5).item() == pytest.approx(0.0235966, abs=1e-6)
    # official UNICOM (straight-through): no threshold, past pi the value rises again: cos(arccos(-0.99) + 0.5)
    assert arcface_cos(torch.tensor([-0.99]), 0.5).item() == pytest.approx(math.cos(math.acos(-0.99) + 0.5), abs=1e-6)
    # the exact-gradient option clamps the angle at pi: cos(pi) = -1
    assert arcface_cos(torch.tensor([-0.99]), 0.5, straight_through=False).item() == pytest.approx(-1.0, abs=1e-6)


def test_arcface_gradient_modes():
    cos = torch.tensor([0.5], requires_grad=True)
    arcface_cos(cos, 0.5, straight_through=True).sum().backward()
    assert cos.grad.item() == pytest.approx(1.0)  # the official in-place no_grad margin: identity gradient
    cos.grad = None
    arcface_cos(cos, 0.5, straight_through=False).sum().backward()
    # d/dc cos(arccos(c) + m) = sin(theta + m) / sin(theta)
    assert cos.grad.item() == pytest.approx(math.sin(math.pi / 3 + 0.5) / math.sin(math.pi / 3), rel=1e-4)


def test_arcface_softmax_by_hand():
    cos = torch.tensor([[0.5, 0.0, -0.5]])
    positive = torch.tensor([[True, False, False]])
    loss = ArcFaceSoftmax(scale=2.0, margin=0.5)(cos, positive)
    a = 2 * math.cos(math.pi / 3 + 0.5)  # target logit 2 * cos(theta + m) = 0.0471609
    expected = math.log(math.exp(a) + math.exp(0.0) + math.exp(-1.0)) - a
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_mlcd_loss_by_hand():
    cos = torch.tensor([[0.8, 0.6, -0.2, 0.1]])
    positive = torch.tensor([[True, True, False, False]])
    loss = MultiLabelClusterLoss(scale=1.0, margin=0.0)(cos, positive)
    pos_term = math.log(1 + math.exp(-0.8) + math.exp(-0.6))  # 0.5756...
    neg_term = math.log(1 + math.exp(-0.2) + math.exp(0.1))  # 1.1554...
    assert loss.item() == pytest.approx(pos_term + neg_term, rel=1e-5)
    # scale and margin: positives use s * cos(theta + m)
    loss = MultiLabelClusterLoss(scale=4.0, margin=0.2)(cos, positive)
    p = [math.cos(math.acos(c) + 0.2) for c in (0.8, 0.6)]
    expected = math.log(1 + sum(math.exp(-4 * x) for x in p)) + math.log(1 + math.exp(-0.8) + math.exp(0.4))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_mlcd_loss_is_stable_at_large_scale():
    cos = torch.tensor([[1.0, -1.0]])
    loss = MultiLabelClusterLoss(scale=1000.0)(cos, torch.tensor([[False, True]]))
    assert torch.isfinite(loss).all() and loss.item() == pytest.approx(2000.0, rel=1e-4)


def _plain_arcface_ce(emb, weight, labels, s, m):
    """Reference: full softmax with the margin on the target, written out directly."""
    cos = F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).T
    target = torch.cos(torch.arccos(cos.gather(1, labels[:, None]).clamp(-1 + 1e-7, 1 - 1e-7)) + m)
    logits = cos.scatter(1, labels[:, None], target) * s
    return F.cross_entropy(logits, labels)


def test_partial_fc_full_rate_equals_full_softmax():
    torch.manual_seed(0)
    emb = torch.randn(6, 8, requires_grad=True)
    labels = torch.tensor([0, 3, 3, 9, 1, 5])
    pfc = PartialFC(10, 8, ArcFaceSoftmax(scale=16.0, margin=0.3, straight_through=False), sample_rate=1.0)
    out = pfc(emb, labels)
    out.loss.backward()
    emb2 = emb.detach().clone().requires_grad_()
    weight2 = pfc.weight.detach().clone().requires_grad_()
    ref = _plain_arcface_ce(emb2, weight2, labels, 16.0, 0.3)
    ref.backward()
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(emb.grad, emb2.grad, rtol=1e-4, atol=1e-6)
    # centre gradients are large (the centres start with norm ~0.03): compare relative to their size
    torch.testing.assert_close(pfc.weight.grad, weight2.grad, rtol=1e-4, atol=1e-5 * weight2.grad.abs().max().item())
    assert out.num_sampled == 10


def test_partial_fc_sampling_keeps_positives_and_is_softmax_over_the_sample():
    torch.manual_seed(1)
    emb = torch.randn(4, 8)
    labels = torch.tensor([2, 17, 17, 40])
    pfc = PartialFC(50, 8, ArcFaceSoftmax(scale=8.0, margin=0.2, straight_through=False), sample_rate=0.2)
    torch.manual_seed(5)
    index, remapped = pfc.sample(labels[:, None])
    assert index.numel() == 10 and {2, 17, 40} <= set(index.tolist())
    assert torch.equal(index[remapped[:, 0]], labels)
    torch.manual_seed(5)  # the same draw inside forward
    out = pfc(emb, labels)
    ref = _plain_arcface_ce(emb, pfc.weight.detach()[index], remapped[:, 0], 8.0, 0.2)
    assert out.num_sampled == 10 and out.loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_partial_fc_multilabel_matches_plain_reference():
    torch.manual_seed(2)
    emb = torch.randn(3, 6)
    labels = torch.tensor([[0, 4], [4, 5], [2, -1]])  # -1 = padding
    pfc = PartialFC(7, 6, MultiLabelClusterLoss(scale=3.0, margin=0.0))
    loss = pfc(emb, labels).loss
    cos = F.normalize(emb, dim=1) @ F.normalize(pfc.weight.detach(), dim=1).T
    rows = []
    for i, labs in enumerate(labels.tolist()):
        pos = [c for c in labs if c >= 0]
        neg = [c for c in range(7) if c not in pos]
        rows.append(math.log(1 + sum(math.exp(-3 * cos[i, c].item()) for c in pos))
                    + math.log(1 + sum(math.exp(3 * cos[i, c].item()) for c in neg)))
    assert loss.item() == pytest.approx(sum(rows) / 3, rel=1e-5)


def test_single_label_objective_rejects_multiple_labels():
    pfc = PartialFC(5, 4, ArcFaceSoftmax())
    with pytest.raises(ValueError, match="one label"):
        pfc(torch.randn(2, 4), torch.tensor([[0, 1], [2, 3]]))


def test_feature_subset_uses_num_feat_dimensions():
    torch.manual_seed(3)
    emb, labels = torch.randn(4, 16), torch.tensor([0, 1, 2, 3])
    pfc = PartialFC(4, 16, ArcFaceSoftmax(scale=4.0, margin=0.0), num_feat=4, seed=7)
    loss = pfc(emb, labels).loss
    dims = torch.randperm(16, generator=torch.Generator().manual_seed(7 * 1_000_003))[:4]
    ref = _plain_arcface_ce(emb[:, dims], pfc.weight.detach()[:, dims], labels, 4.0, 0.0)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_class_range_covers_every_class_once():
    for c, w in ((10, 3), (7, 2), (2, 4)):
        ranges = [class_range(c, r, w) for r in range(w)]
        assert [i for s, e in ranges for i in range(s, e)] == list(range(c))
    assert class_range(10, 0, 3) == (0, 4) and class_range(10, 2, 3) == (7, 10)
