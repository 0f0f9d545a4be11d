"""VLMo multiway transformer: routing through the experts, the shared relative position table, losses."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from unimm.losses.vlmo import itm_loss, mlm_loss, sample_hard_negatives, vqa_loss, vqa_targets
from unimm.methods.vlmo import VLMoModule
from unimm.models.vlmo import VLMo, vlmo_tiny
from unimm.models.vlmo.multiway import RelativePositionBias


def tiny(**kw) -> VLMo:
    torch.manual_seed(0)
    return VLMo(vlmo_tiny(vocab_size=40, hidden_size=32, num_heads=2, **kw)).eval()


def inputs(b=2, t=6, image_size=32):
    torch.manual_seed(1)
    ids = torch.randint(4, 40, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 4:] = 0
    return ids, mask, torch.randn(b, 3, image_size, image_size)


def record_expert_calls(model: VLMo):
    """{(layer, expert): [tokens per call]} filled by forward hooks on every FFN expert."""
    calls: dict[tuple[int, str], list[int]] = {}
    for i, block in enumerate(model.transformer.blocks):
        for name in ("mlp_text", "mlp_imag", "mlp_vl"):
            mlp = getattr(block, name)
            if mlp is not None:
                mlp.register_forward_hook(lambda m, a, o, key=(i, name): calls.setdefault(key, []).append(a[0].shape[1]))
    return calls


def test_shapes_of_every_route():
    model = tiny()
    ids, mask, px = inputs()
    text = model.encode_text(ids, mask)
    image = model.encode_image(px)
    assert text.hidden.shape == text.vl_hidden.shape == (2, 6, 32)
    assert image.hidden.shape == image.vl_hidden.shape == (2, 17, 32)  # 4x4 patches + CLS
    assert model.encode_image_text(ids, mask, px).shape == (2, 6 + 17, 32)
    assert model.encode_text(ids, mask, vl=False).vl_hidden is None
    # no VL layer at all (stage-2 text pretraining): no second CLS
    assert tiny(vlffn_start_layer=3).encode_image(px).vl_hidden is None


def test_vl_expert_only_from_start_layer_in_joint_route():
    model = tiny()  # 3 layers, VL-FFN from layer 2
    calls = record_expert_calls(model)
    ids, mask, px = inputs()
    model.encode_image_text(ids, mask, px)
    assert calls == {(0, "mlp_text"): [6], (0, "mlp_imag"): [17], (1, "mlp_text"): [6], (1, "mlp_imag"): [17],
                     (2, "mlp_vl"): [23]}
    assert model.transformer.blocks[1].mlp_vl is None and model.transformer.blocks[2].mlp_vl is not None


def test_single_modality_routes_and_vl_rerun():
    model = tiny()
    calls = record_expert_calls(model)
    ids, mask, px = inputs()
    model.encode_text(ids, mask, vl=True)
    assert calls == {(0, "mlp_text"): [6], (1, "mlp_text"): [6], (2, "mlp_text"): [6], (2, "mlp_vl"): [6]}
    calls.clear()
    model.encode_image(px, vl=False)
    assert calls == {(0, "mlp_imag"): [17], (1, "mlp_imag"): [17], (2, "mlp_imag"): [17]}


def test_vl_rerun_starts_from_the_input_of_the_start_layer():
    model = tiny()
    ids, mask, _ = inputs()
    out = model.encode_text(ids, mask)
    # independent: run layers 0-1 with the text expert, then layer 2 with the VL expert, then the norm
    x = model.embed_text(ids)
    biases = model.relative_position(model.relative_position.index(6))
    for i in range(2):
        x = model.transformer.blocks[i](x, "text", mask=mask.bool(), bias=biases[i])
    x = model.transformer.norm(model.transformer.blocks[2](x, "vl", mask=mask.bool(), bias=biases[2]))
    torch.testing.assert_close(out.vl_hidden, x)


def reference_block(block, x, bias, expert_norm, expert_mlp):
    """Plain pre-LN block: x + g1*Attn(LN1 x), then x + g2*FFN(LN2 x); qkv bias (q_bias, 0, v_bias)."""
    h = F.layer_norm(x, (x.shape[-1],), block.norm1.weight, block.norm1.bias, eps=1e-6)
    d, heads = x.shape[-1], block.attn.num_heads
    w = block.attn.qkv.weight
    q = h @ w[:d].T + block.attn.q_bias
    k = h @ w[d : 2 * d].T
    v = h @ w[2 * d :].T + block.attn.v_bias
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    attn = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=bias)
    x = x + block.gamma_1 * block.attn.proj(attn.transpose(1, 2).reshape(x.shape))
    h = F.layer_norm(x, (d,), expert_norm.weight, expert_norm.bias, eps=1e-6)
    return x + block.gamma_2 * expert_mlp.fc2(F.gelu(expert_mlp.fc1(h)))


def test_block_matches_plain_reference():
    model = tiny()
    with torch.no_grad():
        model.relative_position.table.normal_()
    block = model.transformer.blocks[2]
    torch.manual_seed(3)
    x = torch.randn(2, 5, 32)
    bias = model.relative_position(model.relative_position.index(5))[2]
    for expert, norm, mlp in (("text", block.norm2_text, block.mlp_text), ("vl", block.norm2_vl, block.mlp_vl)):
        torch.testing.assert_close(block(x, expert, bias=bias), reference_block(block, x, bias, norm, mlp))
    assert block.attn.qkv.bias is None  # k has no bias


def test_relative_position_table_is_shared_and_laid_out_as_official():
    model = tiny()
    tables = [n for n, _ in model.named_parameters() if "relative" in n]
    assert tables == ["relative_position.table"]
    # grid 4 -> (2*4-1)^2 + 3 = 52 image distances; text span 32 -> 52 + 64 + 2 = 118 rows; 2 heads x 3 layers
    assert model.relative_position.table.shape == (118, 6)
    # layer 1 reads columns 2-3: changing them changes the output, through every route
    ids, mask, px = inputs()
    before = model.encode_image_text(ids, mask, px)
    with torch.no_grad():
        model.relative_position.table[:, 2:4] += torch.randn(118, 2)
    assert not torch.allclose(before, model.encode_image_text(ids, mask, px))


def test_relative_position_index_hand_computed():
    # 16 px image, 8 px patches: 2x2 grid -> 9 patch offsets + 3 CLS rows = 12; text span 4 -> 12 + 8 + 2 = 22
    rpb = RelativePositionBias(vlmo_tiny(vocab_size=10, image_size=16, patch_size=8, max_text_len=4,
                                         max_text_len_of_initckpt=4, hidden_size=8, num_heads=2))
    image = rpb.image_index
    assert image[0, 0] == 11 and image[0, 1] == 9 and image[1, 0] == 10
    # patches in row-major order (0,0),(0,1),(1,0),(1,1): offset (dy, dx) -> (dy+1)*3 + (dx+1)
    assert image[1, 1] == 4 and image[1, 4] == 0 and image[4, 1] == 8 and image[2, 3] == 0 * 3 + 2  # (0,1)-(1,0) = (-1, +1)
    text = rpb.text_index
    assert text[0, 0] == 21 and text[0, 2] == 19 and text[2, 0] == 20
    assert text[1, 1] == 16 and text[1, 3] == 18 and text[3, 1] == 14  # (j - i) + 16
    joint = rpb.index(text_len=3, image=True)
    assert joint.shape == (8, 8) and joint[0, 3] == 12 and joint[3, 0] == 13 and joint[5, 2] == 13


def test_text_padding_does_not_change_real_tokens():
    model = tiny()
    ids, mask, px = inputs()
    padded_ids = torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], 1)
    padded_mask = torch.cat([mask, torch.zeros(2, 5, dtype=torch.long)], 1)
    short = model.encode_image_text(ids, mask, px)
    long = model.encode_image_text(padded_ids, padded_mask, px)
    torch.testing.assert_close(short[:, :6], long[:, :6])
    torch.testing.assert_close(short[:, 6:], long[:, 11:])


def test_absolute_positions_and_no_layer_scale_variant():
    model = tiny(relative_position=False, layer_scale_init=None)
    assert model.relative_position is None and model.transformer.pos_embed.shape == (1, 17, 32)
    assert model.transformer.blocks[0].gamma_1 is None
    ids, mask, px = inputs()
    assert model.encode_image_text(ids, mask, px).shape == (2, 23, 32)


def test_hard_negatives_never_pick_the_positive():
    gen = torch.Generator().manual_seed(0)
    b, offset = 4, 4  # rank 1 of 3, global batch 12
    sim = torch.randn(b, 12)
    sim[torch.arange(b), torch.arange(b) + offset] = 50.0  # the positive dominates the softmax
    drawn = torch.stack([sample_hard_negatives(sim, offset, gen) for _ in range(300)])  # [300, B]
    assert not (drawn == torch.arange(b) + offset).any()
    # the draw follows the similarities: a much closer negative wins most of the time
    sim2 = torch.zeros(2, 5)
    sim2[0, 3] = sim2[1, 0] = 5.0
    drawn2 = torch.stack([sample_hard_negatives(sim2, 0, gen) for _ in range(300)])
    assert (drawn2[:, 0] == 3).float().mean() > 0.8 and (drawn2[:, 1] == 0).float().mean() > 0.8
    with pytest.raises(ValueError):
        sample_hard_negatives(torch.zeros(1, 1), 0)


def test_itm_mlm_vqa_losses_hand_computed():
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0], [0.0, 0.5]])
    loss, acc = itm_loss(logits, 1)  # labels 1, 0, 0
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1)) + math.log(1 + math.exp(0.5))) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6) and acc.item() == pytest.approx(2 / 3)
    mlm_logits = torch.zeros(1, 3, 4)
    mlm_logits[0, 1, 2] = 1.0
    loss, acc = mlm_loss(mlm_logits, torch.tensor([[-100, 2, -100]]))
    assert loss.item() == pytest.approx(-math.log(math.e / (math.e + 3)), rel=1e-6) and acc.item() == 1.0
    targets = vqa_targets([[1], [0, 2]], [[1.0], [0.3, 0.6]], 3)
    assert targets.tolist() == [[0, 1.0, 0], [pytest.approx(0.3), 0, pytest.approx(0.6)]]
    bce = vqa_loss(torch.zeros(2, 3), targets)
    assert bce.item() == pytest.approx(math.log(2) * 3, rel=1e-6)  # BCE(0 logit) = ln 2 for any target, x 3 answers


def test_stage2_freezing_trains_exactly_the_text_groups():
    groups = {"text": ["text_embeddings", "token_type_embeddings", "transformer.blocks.*.mlp_text",
                       "transformer.blocks.*.norm2_text", "heads.mlm", "relative_position.table", "transformer.norm"]}
    model = VLMo(vlmo_tiny(vocab_size=40, hidden_size=32, num_heads=2, vlffn_start_layer=3))
    module = VLMoModule(model, partial(torch.optim.AdamW, lr=1e-3), stage="text_mlm", parameter_groups=groups,
                        trainable=["text"], loss_weights={"mlm": 1.0})
    ids, mask, _ = inputs()
    labels = torch.full_like(ids, -100)
    labels[:, 1] = ids[:, 1]
    loss, _ = module.compute_loss({"keys": ["a", "b"], "text": {"mlm_input_ids": ids, "attention_mask": mask,
                                                                "mlm_labels": labels}})
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected_prefixes = ("text_embeddings.", "token_type_embeddings.", "heads.mlm.", "relative_position.table",
                         "transformer.norm.")
    for n in trainable:
        assert n.startswith(expected_prefixes) or ".mlp_text." in n or ".norm2_text." in n, n
    assert "transformer.blocks.0.attn.qkv.weight" not in trainable and "transformer.blocks.0.mlp_imag.fc1.weight" not in trainable
    assert with_grad <= trainable
    assert "transformer.blocks.2.mlp_text.fc1.weight" in with_grad and "heads.mlm.decoder.weight" in with_grad
    with pytest.raises(ValueError, match="match no parameter"):
        VLMoModule(model, partial(torch.optim.AdamW, lr=1e-3), parameter_groups={"x": ["transformer.blocks.*.mlp_txt"]})


class StubTokenizer:
    """Ids 0-3 special ([PAD] [UNK] [CLS] [SEP]); 4.. the tokens below (## = continuation)."""

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "play", "##ing", "foot", "##ball", "now", "here", "##s", "we", "go"]
    all_special_ids = [0, 1, 2, 3]
    mask_token_id = None

    def convert_ids_to_tokens(self, ids):
        return [self.tokens[i] for i in ids]

    def __len__(self):
        return len(self.tokens)


def test_whole_word_masking_groups_wordpieces_and_masks_15_percent():
    from unimm.data.mlm import WholeWordMasker

    masker = WholeWordMasker(StubTokenizer(), probability=0.15, mask_token_id="append", seed=0)
    assert masker.mask_token_id == 13
    seq = [2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 3]  # [CLS] play ##ing foot ##ball now here ##s we go [SEP]
    assert masker.words(seq) == [[1, 2], [3, 4], [5], [6, 7], [8], [9]]
    ids = torch.tensor([seq + [0, 0]])
    mask = torch.tensor([[1] * 11 + [0, 0]])
    words = {1: [1, 2], 2: [1, 2], 3: [3, 4], 4: [3, 4], 5: [5], 6: [6, 7], 7: [6, 7], 8: [8], 9: [9]}
    for _ in range(50):
        masked, labels = masker(ids, mask)
        chosen = (labels[0] != -100).nonzero().flatten().tolist()
        assert 1 <= len(chosen) <= 2  # round(0.15 * 11) = 2 tokens, whole words only
        for pos in chosen:
            assert set(words[pos]) <= set(chosen) and labels[0, pos] == ids[0, pos]
        assert not {0, 10, 11, 12} & set(chosen)  # never specials or padding
        assert torch.equal(masked[0, labels[0] == -100], ids[0, labels[0] == -100])


def test_attention_equals_explicit_softmax_with_bias_and_padding():
    """The fused SDPA path equals softmax(q k^T * scale + bias, padded keys at -inf) v written out by hand."""
    attn = tiny().transformer.blocks[0].attn
    torch.manual_seed(5)
    b, n, d, h = 3, 7, 32, attn.num_heads
    x, bias = torch.randn(b, n, d), torch.randn(h, n, n)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2, 2:] = False
    w = attn.qkv.weight
    split = lambda t: t.reshape(b, n, h, -1).transpose(1, 2)  # noqa: E731
    q = split(x @ w[:d].T + attn.q_bias)
    k = split(x @ w[d : 2 * d].T)
    v = split(x @ w[2 * d :].T + attn.v_bias)
    logits = (q @ k.transpose(-2, -1)) * (d // h) ** -0.5 + bias
    logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
    expected = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d))
    torch.testing.assert_close(attn(x, mask=mask, bias=bias), expected, atol=1e-6, rtol=1e-5)
