"""Released VLMo checkpoints (official key layout, written here) and BEiT stage-1 init load into our model."""

from __future__ import annotations

import pytest
import torch

from unimm.checkpoints.io import load_checkpoint
from unimm.checkpoints.vlmo import load_beit_into_vlmo, load_official_vlmo
from unimm.models.vlmo import VLMo, vlmo_tiny

D, L, H, V, START, PATCH, TEXT, INIT_TEXT = 32, 3, 2, 40, 2, 8, 8, 8


def config():
    return vlmo_tiny(vocab_size=V, hidden_size=D, num_layers=L, num_heads=H, vlffn_start_layer=START, patch_size=PATCH,
                     max_text_len=TEXT, max_text_len_of_initckpt=INIT_TEXT, mlm=True)


def official_state_dict(seed=0) -> dict[str, torch.Tensor]:
    """A checkpoint in the layout of the official ``VLMo`` LightningModule, shapes written out by hand."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.1  # noqa: E731
    grid = 32 // PATCH
    n_img = (2 * grid - 1) ** 2 + 3
    sd = {
        "transformer.cls_token": r(1, 1, D), "transformer.patch_embed.proj.weight": r(D, 3, PATCH, PATCH),
        "transformer.patch_embed.proj.bias": r(D), "transformer.norm.weight": 1 + r(D), "transformer.norm.bias": r(D),
        "relative_position_bias_table": r(n_img + 2 * INIT_TEXT + 2, H * L),
        "relative_position_index": torch.zeros(grid * grid + 1, grid * grid + 1, dtype=torch.long),
        "text_relative_position_index": torch.zeros(TEXT, TEXT, dtype=torch.long),
        "text_imag_relative_position_index": torch.zeros(TEXT + 17, TEXT + 17, dtype=torch.long),
        "text_embeddings.word_embeddings.weight": r(V, D), "text_embeddings.position_embeddings.weight": r(196, D),
        "text_embeddings.token_type_embeddings.weight": r(2, D), "text_embeddings.LayerNorm.weight": 1 + r(D),
        "text_embeddings.LayerNorm.bias": r(D), "text_embeddings.position_ids": torch.arange(196)[None],
        "token_type_embeddings.weight": r(2, D), "pooler.dense.weight": r(D, D), "pooler.dense.bias": r(D),
        "itm_score.fc.weight": r(2, D), "itm_score.fc.bias": r(2),
        "logit_scale": torch.tensor(2.5), "logit_vl_scale": torch.tensor(3.0),
        "mlm_score.transform.dense.weight": r(D, D), "mlm_score.transform.dense.bias": r(D),
        "mlm_score.transform.LayerNorm.weight": 1 + r(D), "mlm_score.transform.LayerNorm.bias": r(D),
        "mlm_score.decoder.weight": r(V, D), "mlm_score.bias": r(V),
    }
    for name in ("text", "image", "vl_text", "vl_image"):
        sd[f"itc_{name}_proj.fc.weight"] = r(D, D)
    for i in range(L):
        p = f"transformer.blocks.{i}."
        sd.update({p + "gamma_1": r(D), p + "gamma_2": r(D), p + "norm1.weight": 1 + r(D), p + "norm1.bias": r(D),
                   p + "attn.qkv.weight": r(3 * D, D), p + "attn.q_bias": r(D), p + "attn.v_bias": r(D),
                   p + "attn.proj.weight": r(D, D), p + "attn.proj.bias": r(D)})
        for expert in ("text", "imag") + (("vl",) if i >= START else ()):
            sd.update({p + f"norm2_{expert}.weight": 1 + r(D), p + f"norm2_{expert}.bias": r(D),
                       p + f"mlp_{expert}.fc1.weight": r(4 * D, D), p + f"mlp_{expert}.fc1.bias": r(4 * D),
                       p + f"mlp_{expert}.fc2.weight": r(D, 4 * D), p + f"mlp_{expert}.fc2.bias": r(D)})
    return sd


def outputs(model: VLMo):
    torch.manual_seed(5)
    ids, mask, px = torch.randint(4, V, (2, TEXT)), torch.ones(2, TEXT, dtype=torch.long), torch.randn(2, 3, 32, 32)
    mask[1, 5:] = 0
    heads = model.heads
    joint = model.encode_image_text(ids, mask, px)
    text, image = model.encode_text(ids, mask), model.encode_image(px)
    return [joint, heads.itm(heads.pooler(joint)), heads.mlm(joint[:, :TEXT]), heads.itc.vl_text(text.vl_hidden[:, 0]),
            heads.itc.image(image.hidden[:, 0])]


@pytest.mark.parametrize("wrap", ["raw", "state_dict", "module", "model"])
def test_official_checkpoint_loads_fully_and_round_trips(tmp_path, wrap):
    official = official_state_dict()
    ckpt = {"raw": official, "state_dict": {"state_dict": official, "epoch": 3},
            "module": {"module": {f"module.{k}": v for k, v in official.items()}}, "model": {"model": official}}[wrap]
    torch.save(ckpt, tmp_path / "vlmo.pt")
    model = VLMo(config()).eval()
    report = load_official_vlmo(model, tmp_path / "vlmo.pt")  # raises on any missing / unexpected key
    assert report.missing == []
    assert sorted(report.dropped) == sorted(["relative_position_index", "text_relative_position_index",
                                             "text_imag_relative_position_index", "text_embeddings.position_ids"])
    assert report.truncated == {"text_embeddings.position_embeddings.weight": (196, TEXT)}
    assert len(report.loaded) == len(official) - 4
    # values land where the official model reads them
    own = model.state_dict()
    assert torch.equal(own["relative_position.table"], official["relative_position_bias_table"])
    assert torch.equal(own["heads.itc.vl_text.weight"], official["itc_vl_text_proj.fc.weight"])
    assert torch.equal(own["heads.mlm.bias"], official["mlm_score.bias"])
    assert torch.equal(own["transformer.blocks.2.mlp_vl.fc2.bias"], official["transformer.blocks.2.mlp_vl.fc2.bias"])
    assert torch.equal(own["text_embeddings.position_embeddings.weight"],
                       official["text_embeddings.position_embeddings.weight"][:TEXT])
    assert model.heads.itc.logit_vl_scale.item() == 3.0
    # save through our format and load into a fresh model: identical outputs
    torch.save(model.state_dict(), tmp_path / "ours.pt")
    fresh = VLMo(config()).eval()
    fresh.load_state_dict(load_checkpoint(tmp_path / "ours.pt"), strict=True)
    with torch.no_grad():
        for a, b in zip(outputs(model), outputs(fresh), strict=True):
            assert torch.equal(a, b)
        assert not torch.equal(outputs(VLMo(config()).eval())[0], outputs(model)[0])  # the weights matter


def test_unmapped_and_missing_keys_are_errors(tmp_path):
    official = official_state_dict()
    torch.save({**official, "some_new_head.weight": torch.zeros(2)}, tmp_path / "extra.pt")
    with pytest.raises(KeyError, match="some_new_head"):
        load_official_vlmo(VLMo(config()), tmp_path / "extra.pt")
    stage2 = {k: v for k, v in official.items() if ".mlp_vl." not in k and ".norm2_vl." not in k}
    torch.save(stage2, tmp_path / "stage2.pt")
    with pytest.raises(KeyError, match="mlp_vl"):
        load_official_vlmo(VLMo(config()), tmp_path / "stage2.pt")
    report = load_official_vlmo(VLMo(config()), tmp_path / "stage2.pt",
                                allow_missing=["transformer.blocks.2.mlp_vl", "transformer.blocks.2.norm2_vl"])
    assert len(report.missing) == 6
    wrong = dict(official, **{"pooler.dense.weight": torch.zeros(D + 1, D)})
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(KeyError, match="pooler"):
        load_official_vlmo(VLMo(config()), tmp_path / "wrong.pt")


def test_beit_image_side_init(tmp_path):
    g = torch.Generator().manual_seed(1)
    n_img = (2 * 4 - 1) ** 2 + 3
    beit = {"cls_token": torch.randn(1, 1, D, generator=g), "patch_embed.proj.weight": torch.randn(D, 3, PATCH, PATCH, generator=g),
            "patch_embed.proj.bias": torch.randn(D, generator=g), "fc_norm.weight": torch.ones(D), "fc_norm.bias": torch.zeros(D),
            "head.weight": torch.zeros(1000, D), "head.bias": torch.zeros(1000)}
    for i in range(L):
        p = f"blocks.{i}."
        for name, shape in (("gamma_1", (D,)), ("gamma_2", (D,)), ("norm1.weight", (D,)), ("norm1.bias", (D,)),
                            ("attn.qkv.weight", (3 * D, D)), ("attn.q_bias", (D,)), ("attn.v_bias", (D,)),
                            ("attn.proj.weight", (D, D)), ("attn.proj.bias", (D,)), ("norm2.weight", (D,)), ("norm2.bias", (D,)),
                            ("mlp.fc1.weight", (4 * D, D)), ("mlp.fc1.bias", (4 * D,)), ("mlp.fc2.weight", (D, 4 * D)),
                            ("mlp.fc2.bias", (D,)), ("attn.relative_position_bias_table", (n_img, H))):
            beit[p + name] = torch.randn(*shape, generator=g)
        beit[p + "attn.relative_position_index"] = torch.zeros(17, 17, dtype=torch.long)
    torch.save({"model": beit}, tmp_path / "beit.pth")
    model = VLMo(config())
    text_before = model.transformer.blocks[0].mlp_text.fc1.weight.detach().clone()
    table_before = model.relative_position.table.detach().clone()
    report = load_beit_into_vlmo(model, tmp_path / "beit.pth")
    assert torch.equal(model.transformer.blocks[1].mlp_imag.fc1.weight, beit["blocks.1.mlp.fc1.weight"])
    assert torch.equal(model.transformer.blocks[2].norm2_imag.bias, beit["blocks.2.norm2.bias"])
    assert torch.equal(model.transformer.blocks[0].mlp_text.fc1.weight, text_before)  # L-FFN is new
    table = model.relative_position.table
    # layer l, head h reads column l*H + h
    assert torch.equal(table[:n_img, 1 * H + 1], beit["blocks.1.attn.relative_position_bias_table"][:, 1])
    assert torch.equal(table[n_img:], table_before[n_img:])  # text rows untouched
    assert "head.weight" in report.dropped and "blocks.0.attn.relative_position_index" in report.dropped
    assert "text_embeddings.word_embeddings.weight" in report.missing


def test_nlvr2_model_gets_a_third_token_type_copied_from_the_image_row(tmp_path):
    official = official_state_dict()
    torch.save(official, tmp_path / "vlmo.pt")
    model = VLMo(vlmo_tiny(**{**config().__dict__, "nlvr2": True, "num_token_types": 3}))
    report = load_official_vlmo(model, tmp_path / "vlmo.pt", allow_missing=["heads.nlvr2"])
    weight = model.token_type_embeddings.weight
    assert torch.equal(weight[:2], official["token_type_embeddings.weight"])
    assert torch.equal(weight[2], official["token_type_embeddings.weight"][1])
    assert len(report.missing) == 6  # the new NLVR2 classifier: 0, 1, 3 x (weight, bias)
