"""Last-token pooling: the right position for left and right padding, checked on hand-built masks."""

import torch

from unimm.models.vlm.pooling import last_token_index, last_token_pool


def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([
        [1, 1, 1, 0, 0],   # right padded: last real token at 2
        [0, 0, 1, 1, 1],   # left padded: 4
        [1, 1, 1, 1, 1],   # full: 4
        [0, 1, 0, 0, 0],   # a single token: 1
    ])
    assert last_token_index(mask).tolist() == [2, 4, 4, 1]


def test_pool_picks_that_token_and_normalises():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    out = last_token_pool(hidden, mask)
    expected = torch.stack([hidden[0, 1], hidden[1, 2]])
    expected = expected / expected.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))
