"""InfoNCE against values computed by hand (explicit math.exp / math.log, no torch softmax)."""

import math

import pytest
import torch

from unimm.losses import ContrastiveOutput, InfoNCE, gather_no_grad, gather_with_grad, world_info


def ce(logits: list[float], target: int) -> float:
    """Cross-entropy of one row written out: -logit[target] + log(sum_j exp(logit_j))."""
    return -logits[target] + math.log(sum(math.exp(v) for v in logits))


# Three 2-D queries and their positives, unnormalised (InfoNCE uses embeddings as given).
Q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
C = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
# Dot products q_i . c_j by hand:   c1 c2 c3
#                              q1 [ 2, 0, 1 ]
#                              q2 [ 0, 1, 2 ]
#                              q3 [ 2, 1, 3 ]
# With temperature 0.5 (scale 2) the q2c logit rows are [4,0,2], [0,2,4], [4,2,6] (targets 0,1,2);
# the c2q rows are the columns: [4,0,4], [0,2,2], [2,4,6].
Q2C = (ce([4, 0, 2], 0) + ce([0, 2, 4], 1) + ce([4, 2, 6], 2)) / 3
C2Q = (ce([4, 0, 4], 0) + ce([0, 2, 2], 1) + ce([2, 4, 6], 2)) / 3


def test_hand_example_q2c():
    out = InfoNCE(temperature=0.5)(Q, C)
    assert isinstance(out, ContrastiveOutput)
    assert out.loss.item() == pytest.approx(Q2C, abs=1e-6)
    assert set(out.terms) == {"q2c"}
    assert out.logits.tolist() == [[4, 0, 2], [0, 2, 4], [4, 2, 6]]
    # row argmaxes 0, 2, 2 against targets 0, 1, 2: two of three right
    assert out.accuracy.item() == pytest.approx(2 / 3)


def test_hand_example_c2q_direction():
    # The c2q term is the q2c loss with the roles swapped.
    assert InfoNCE(temperature=0.5)(C, Q).loss.item() == pytest.approx(C2Q, abs=1e-6)


def test_hand_example_symmetric():
    out = InfoNCE(temperature=0.5, symmetric=True)(Q, C)
    assert out.loss.item() == pytest.approx((Q2C + C2Q) / 2, abs=1e-6)
    assert out.terms["q2c"].item() == pytest.approx(Q2C, abs=1e-6)
    assert out.terms["c2q"].item() == pytest.approx(C2Q, abs=1e-6)
    assert Q2C != pytest.approx(C2Q)  # the example really distinguishes the two directions


def test_logit_scale_equals_temperature_and_overrides_it():
    by_temp = InfoNCE(temperature=0.5)(Q, C).loss
    by_scale = InfoNCE(temperature=None)(Q, C, logit_scale=torch.tensor(2.0, dtype=torch.float64))
    # logit_scale wins over the constructor's temperature
    overridden = InfoNCE(temperature=0.07)(Q, C, logit_scale=torch.tensor(2.0, dtype=torch.float64))
    assert by_scale.loss.item() == pytest.approx(by_temp.item(), abs=1e-12)
    assert overridden.loss.item() == pytest.approx(Q2C, abs=1e-6)


def test_logit_scale_gradient():
    # d/ds of mean_i CE(s * S_i, i) = mean_i (E_softmax[S_i] - S_ii), from the hand-written S at s = 2.
    rows = [([2, 0, 1], 0), ([0, 1, 2], 1), ([2, 1, 3], 2)]
    expected = 0.0
    for S, t in rows:
        w = [math.exp(2 * v) for v in S]
        expected += (sum(wi * v for wi, v in zip(w, S, strict=True)) / sum(w) - S[t]) / 3
    s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    InfoNCE(temperature=None)(Q, C, logit_scale=s).loss.backward()
    assert s.grad.item() == pytest.approx(expected, abs=1e-6)


def test_hard_negatives_append_expected_columns():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # one hard negative per query: q1 . (3, 0) = 3, q2 . (0, -1) = -1
    neg = torch.tensor([[[3.0, 0.0]], [[0.0, -1.0]]])
    out = InfoNCE(temperature=1.0)(q, c, hard_negatives=neg)
    assert out.logits.tolist() == [[1, 0, 3], [0, 1, -1]]
    assert out.loss.item() == pytest.approx((ce([1, 0, 3], 0) + ce([0, 1, -1], 1)) / 2, abs=1e-6)
    assert out.accuracy.item() == pytest.approx(0.5)  # row 1's hard negative outscores its positive
    # Symmetric: the c2q direction ignores the hard negatives (they are candidates, not queries).
    sym = InfoNCE(temperature=1.0, symmetric=True)(q, c, hard_negatives=neg)
    c2q = (ce([1, 0], 0) + ce([0, 1], 1)) / 2
    assert sym.loss.item() == pytest.approx(((ce([1, 0, 3], 0) + ce([0, 1, -1], 1)) / 2 + c2q) / 2, abs=1e-6)


def test_no_scale_raises():
    with pytest.raises(ValueError, match="scale"):
        InfoNCE(temperature=None)(Q, C)


def test_shape_errors():
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        InfoNCE()(Q, C[:2])
    with pytest.raises(ValueError, match="hard_negatives"):
        InfoNCE()(Q, C, hard_negatives=torch.zeros(3, 2))


def test_gathers_are_identity_without_process_group():
    x = torch.randn(4, 3, requires_grad=True)
    assert world_info() == (0, 1)
    assert gather_with_grad(x) is x
    g = gather_no_grad(x)
    assert torch.equal(g, x) and not g.requires_grad
