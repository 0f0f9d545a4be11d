"""Qwen2-VL, LLaVA (1.5 layout) and LLaVA-NeXT adapters on tiny random models: input layout, embeddings that do
not depend on batch composition or padding side, and LLaVA loading from a folder in the official (xtuner) layout."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from unimm.models.vlm.adapters import (
    LlavaAdapter,
    LlavaBackbone,
    llava_next_tiny_processor,
    qwen2vl_tiny_processor,
    special_token_tokenizer,
    tiny_llava_next,
    tiny_qwen2vl,
)
from unimm.models.vlm.llava import llava_from_pretrained, llava_processor, llava_tiny_processor, tiny_llava
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
    "llava": (llava_tiny_processor, tiny_llava),
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
    assert proc.image_token == "<|image_pad|>"  # VLM2Vec's format by default
    red, green = images()
    out = proc([f"{proc.image_token} red", "blue"], [[red], []])
    # 56 px -> 4x4 patches of 14 px -> 16 patches, 2x2 merge -> 4 LM tokens
    assert out["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert out["pixel_values"].shape == (16, 3 * 2 * 14 * 14)
    # [BOS] 4 x <pad> red [EOS] = 7 tokens; "blue" row: [BOS] blue [EOS], left padded by 4
    assert out["attention_mask"].tolist()[1] == [0] * 4 + [1] * 3
    assert out["input_ids"][0, 1:5].eq(proc.image_token_id).all()
    assert out["mm_token_type_ids"].sum() == 0  # VLM2Vec's prompts: no M-RoPE image positions
    native = qwen2vl_tiny_processor(vocab, image_size=56, padding_side="left", image_format="native")
    out = native([f"{native.image_token} red", "blue"], [[red], []])
    # [BOS] <vs> 4 x <pad> <ve> red [EOS] = 9 tokens
    assert out["attention_mask"].tolist()[1] == [0] * 6 + [1] * 3
    assert out["input_ids"][0, 2:6].eq(native.image_token_id).all()
    assert out["mm_token_type_ids"][0].sum() == 4 and out["mm_token_type_ids"][1].sum() == 0
    with pytest.raises(ValueError, match="image_format 'chat'"):
        qwen2vl_tiny_processor(vocab, image_format="chat")


def test_qwen2vl_vlm2vec_format_uses_text_positions(vocab):
    """VLM2Vec's Qwen2-VL prompts carry <|image_pad|> alone; its get_rope_index (src/model/vlm_backbone/qwen2_vl)
    counts an image only where <|vision_start|> precedes it, so every real token gets the 1-D position 0..n-1.
    The native format keeps M-RoPE (the 4 image tokens of a 2x2 grid share the temporal position)."""
    model = tiny_qwen2vl(vocab).eval()
    red = images()[0]
    vlm2vec = qwen2vl_tiny_processor(vocab, image_size=56, padding_side="left")
    inputs = vlm2vec([f"{vlm2vec.image_token} red", "blue"], [[red], []])
    pos = model.position_ids(inputs)
    assert pos[0].tolist() == list(range(7)) and pos[1, 4:].tolist() == [0, 1, 2]
    native = qwen2vl_tiny_processor(vocab, image_size=56, image_format="native")
    n_inputs = native([f"{native.image_token} red"], [[red]])
    n_pos = model.position_ids(n_inputs)
    assert n_pos.shape == (3, 1, 9) and n_pos[0, 0, 2:6].tolist() == [2, 2, 2, 2]  # temporal index of the image
    with torch.no_grad():
        a = last_token_pool(model(inputs), inputs["attention_mask"])[0]
        b = last_token_pool(model(n_inputs), n_inputs["attention_mask"])[0]
    assert (a - b).abs().max() > 1e-3  # the two formats are different inputs


def test_qwen2vl_positions_equal_vlm2vec_get_rope_index(vocab):
    """Rotary positions of both image formats against VLM2Vec's own Qwen2-VL get_rope_index (recorded by
    tests/golden/scripts/qwen2vl_positions.py on symbolic rows)."""
    golden = json.loads((Path(__file__).parent / "golden" / "qwen2vl" / "positions.json").read_text())
    model = tiny_qwen2vl(vocab)
    for name, row in golden["rows"].items():
        proc = qwen2vl_tiny_processor(vocab, image_format="native" if name == "native" else "vlm2vec")
        tok = proc.tokenizer
        ids = [proc.pad_token_id if s == "pad" else tok.convert_tokens_to_ids("red") if s == "text"
               else tok.convert_tokens_to_ids(f"<|{s}|>") for s in row["symbols"]]
        inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.tensor([[int(s != "pad") for s in
                                                                                    row["symbols"]]]),
                  "mm_token_type_ids": torch.tensor([proc.token_type(ids)["mm_token_type_ids"]]),
                  "image_grid_thw": torch.tensor([golden["image_grid_thw"]])}
        pos = model.position_ids(inputs)
        pos = pos.expand(3, *pos.shape[-2:]) if pos.ndim == 2 else pos  # 1-D: the model repeats it 3 times
        real = inputs["attention_mask"][0].bool()
        assert [p[0][real].tolist() for p in pos] == row["positions"], name


def test_truncation_never_cuts_image_tokens(vocab):
    proc = qwen2vl_tiny_processor(vocab, image_size=56, max_length=6)
    out = proc([f"{proc.image_token} " + "red " * 20], [[images()[0]]])
    assert out["input_ids"].eq(proc.image_token_id).sum() == 4  # all 4 image tokens kept
    assert out["input_ids"].shape[1] == 6 - 1 + 4  # 6 text-level tokens, the image token expanded to 4
    with pytest.raises(ValueError, match="image tokens after truncation"):
        qwen2vl_tiny_processor(vocab, image_size=56, max_length=3)(["red red red " + proc.image_token], [[images()[0]]])


@pytest.mark.parametrize("name", ["llava", "llava_next", "qwen2vl_vlm2vec", "qwen2vl_native"])
def test_ids_equal_the_native_transformers_processor(name, vocab, monkeypatch):
    """Same ids and image tensors as transformers' own processor on the same prompt (it expands the image token
    in the text, then tokenises the whole string once: one BOS, as the adapters), for prompts nothing truncates."""
    from transformers import LlavaNextProcessor, LlavaProcessor, Qwen2VLProcessor

    if name.startswith("qwen2vl"):
        proc = qwen2vl_tiny_processor(vocab, image_size=56, image_format=name.split("_")[1])
        # its video-processor class check needs torchvision (absent here); no video is processed
        monkeypatch.setattr(Qwen2VLProcessor, "check_argument_for_proper_class", lambda *a: None)
        native = Qwen2VLProcessor(image_processor=proc.image_processor, tokenizer=proc.tokenizer,
                                  video_processor=None, chat_template="")
    else:
        proc = llava_tiny_processor(vocab) if name == "llava" else llava_next_tiny_processor(vocab)
        cls = LlavaProcessor if name == "llava" else LlavaNextProcessor
        native = cls(image_processor=proc.image_processor, tokenizer=proc.tokenizer, patch_size=8,
                     vision_feature_select_strategy="default", image_token="<image>", num_additional_image_tokens=1)
    red, green = images()
    for text, imgs in ((f"{proc.image_token} a red digit", [red]), (f"seven {proc.image_token} blue", [green]),
                       ("a blue digit", [])):
        ours = proc([text], [imgs])
        theirs = native(text=[text], images=imgs or None, return_tensors="pt")
        assert ours["input_ids"].tolist() == theirs["input_ids"].tolist(), text
        for key in ("pixel_values", "image_grid_thw", "image_sizes"):
            if key in theirs:
                torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=0)


def test_llava_next_token_count_matches_model(vocab):
    proc, model = llava_next_tiny_processor(vocab), tiny_llava_next(vocab)
    red, green = images()
    out = proc([f"{proc.image_token} red", f"{proc.image_token} blue"], [[red], [green]])
    # 32x32 -> one 32 px tile: 4x4 base + 4x4 grid features + 4 newlines = 36; the wide image takes a 32x64 grid
    assert (out["input_ids"] == proc.image_token_id).sum(1).tolist()[0] == 36
    model(out)  # the model checks the count against its own features and raises on a mismatch


def test_unknown_checkpoint_folder_is_named(tmp_path):
    from unimm.models.vlm.adapters import qwen2vl_from_pretrained

    for load in (qwen2vl_from_pretrained, llava_from_pretrained):
        with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
            load(str(Path(tmp_path) / "missing"))


def test_llava_token_count_matches_model(vocab):
    proc, model = llava_tiny_processor(vocab), tiny_llava(vocab)
    red, green = images()
    out = proc([f"<|user|> {proc.image_token} red <|end|> <|assistant|>", f"{proc.image_token} blue"], [[red], [green]])
    # any image -> one 32 px view of 8 px patches: 4 x 4 = 16 tokens (CLS dropped: strategy "default"), no tiles
    assert (out["input_ids"] == proc.image_token_id).sum(1).tolist() == [16, 16]
    assert out["pixel_values"].shape == (2, 3, 32, 32) and "image_sizes" not in out
    model(out)  # the model checks the count against its own features and raises on a mismatch
    # the real geometry (CLIP ViT-L/14-336): 24 x 24 = 576 tokens per image
    real = LlavaAdapter(special_token_tokenizer(vocab, ("<image>",)),
                        CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}))
    assert (real(["<image> red"], [[green]])["input_ids"] == real.image_token_id).sum() == 576


def _legacy_key(key: str) -> str:
    """transformers' current LLaVA key -> the layout of the llava-hf / xtuner exports (LM under language_model)."""
    for new, old in (("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
                     ("model.multi_modal_projector.", "multi_modal_projector."), ("lm_head.", "language_model.lm_head.")):
        if key.startswith(new):
            return old + key[len(new):]
    raise KeyError(key)


def _write_xtuner_layout(folder: Path, vocab: str, drop: str | None = None) -> LlavaForConditionalGeneration:
    """A random tiny LLaVA as xtuner/llava-phi-3-mini-hf ships it: Phi-3 LM exported as Llama, legacy keys."""
    tok = special_token_tokenizer(vocab, ("<image>",))
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       image_size=32, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4, pad_token_id=0),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default")
    torch.manual_seed(1)
    model = LlavaForConditionalGeneration(config).eval()
    state = {_legacy_key(k): v.contiguous() for k, v in model.state_dict().items() if k != drop}
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
    tok.save_pretrained(folder)  # the processor files beside the weights, as the official folder has them
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return model


def test_llava_loads_the_official_layout(vocab, tmp_path):
    reference = _write_xtuner_layout(tmp_path / "llava", vocab)
    loaded = llava_from_pretrained(str(tmp_path / "llava")).eval()
    proc = llava_processor(str(tmp_path / "llava"), patch_size=8)
    red, green = images()
    texts, imgs = [f"{proc.image_token} red digit", "blue seven"], [[red], []]
    torch.testing.assert_close(embed(proc, loaded, texts, imgs), embed(proc, LlavaBackbone(reference.model), texts, imgs))


def test_llava_missing_checkpoint_key_is_an_error(vocab, tmp_path):
    _write_xtuner_layout(tmp_path / "llava", vocab, drop="model.multi_modal_projector.linear_2.weight")
    with pytest.raises(ValueError, match="multi_modal_projector.linear_2.weight"):
        llava_from_pretrained(str(tmp_path / "llava"))
