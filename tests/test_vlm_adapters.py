"""Qwen2-VL and LLaVA-NeXT adapters on tiny random models: input layout, and embeddings that do not depend on
batch composition or padding side."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from unimm.models.vlm.adapters import (
    llava_next_tiny_processor,
    qwen2vl_tiny_processor,
    tiny_llava_next,
    tiny_qwen2vl,
)
from unimm.models.vlm.pooling import last_token_pool

WORDS = "a red green blue digit seven small large"


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(WORDS.split()))
    return str(path)


def images():
    return [Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (60, 30), (0, 255, 0))]


BUILDERS = {
    "qwen2vl": (lambda v: qwen2vl_tiny_processor(v, image_size=56), tiny_qwen2vl),
    "llava_next": (llava_next_tiny_processor, tiny_llava_next),
}


def embed(proc, model, texts, imgs):
    inputs = proc(texts, imgs)
    with torch.no_grad():
        return last_token_pool(model(inputs), inputs["attention_mask"])


@pytest.mark.parametrize("name", list(BUILDERS))
def test_embedding_independent_of_batch_and_padding(name, vocab):
    make_proc, make_model = BUILDERS[name]
    proc, model = make_proc(vocab), make_model(vocab).eval()
    t = proc.image_token
    red, green = images()
    texts = [f"{t} a red digit", "a blue digit seven small large a red", f"{t} seven"]
    imgs = [[red], [], [green]]
    reference = {}
    for side in ("left", "right"):
        proc.padding_side = side
        batch = embed(proc, model, texts, imgs)
        alone = torch.cat([embed(proc, model, [x], [i]) for x, i in zip(texts, imgs)])
        torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
        reference[side] = batch
    torch.testing.assert_close(reference["left"], reference["right"], atol=1e-5, rtol=1e-5)
    # and the embeddings do depend on the input (rows differ)
    assert (reference["left"][0] - reference["left"][2]).abs().max() > 1e-3


def test_qwen2vl_inputs(vocab):
    proc = qwen2vl_tiny_processor(vocab, image_size=56, padding_side="left")
    red, green = images()
    out = proc([f"{proc.image_token} red", "blue"], [[red], []])
    # 56 px -> 4x4 patches of 14 px -> 16 patches, 2x2 merge -> 4 LM tokens
    assert out["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert out["pixel_values"].shape == (16, 3 * 2 * 14 * 14)
    assert out["mm_token_type_ids"][0].sum() == 4 and out["mm_token_type_ids"][1].sum() == 0
    # [BOS] <vs> 4 x <pad> <ve> red [EOS] = 9 tokens; "blue" row: [BOS] blue [EOS], left padded by 6
    assert out["attention_mask"].tolist()[1] == [0] * 6 + [1] * 3
    assert out["input_ids"][0, 2:6].eq(proc.image_token_id).all()


def test_truncation_never_cuts_image_tokens(vocab):
    proc = qwen2vl_tiny_processor(vocab, image_size=56, max_length=6)
    out = proc([f"{proc.image_token} " + "red " * 20], [[images()[0]]])
    assert out["mm_token_type_ids"].sum() == 4  # all 4 image tokens kept
    assert out["input_ids"].shape[1] == 6 - 1 + 4  # 6 text-level tokens, the image token expanded to 4
    with pytest.raises(ValueError, match="image tokens after truncation"):
        qwen2vl_tiny_processor(vocab, image_size=56, max_length=3)(["red red red " + proc.image_token], [[images()[0]]])


def test_llava_next_token_count_matches_model(vocab):
    proc, model = llava_next_tiny_processor(vocab), tiny_llava_next(vocab)
    red, green = images()
    out = proc([f"{proc.image_token} red", f"{proc.image_token} blue"], [[red], [green]])
    # 32x32 -> one 32 px tile: 4x4 base + 4x4 grid features + 4 newlines = 36; the wide image takes a 32x64 grid
    assert (out["input_ids"] == proc.image_token_id).sum(1).tolist()[0] == 36
    model(out)  # the model checks the count against its own features and raises on a mismatch


def test_unknown_checkpoint_folder_is_named(tmp_path):
    from unimm.models.vlm.adapters import qwen2vl_from_pretrained

    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        qwen2vl_from_pretrained(str(Path(tmp_path) / "missing"))
