"""LoRA / DoRA on a tiny Qwen2-VL: adapters change the embedding; saved + reloaded, or merged, they give the same."""

import pytest
import torch
from PIL import Image

from unimm.models.vlm.adapters import qwen2vl_tiny_processor, tiny_qwen2vl
from unimm.models.vlm.lora import LoraSpec, apply_lora, load_adapters, merge_adapters, save_adapters
from unimm.models.vlm.pooling import last_token_pool


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("a\nred\nblue\ndigit\n")
    return str(path)


def embed(model, inputs):
    model.eval()
    with torch.no_grad():
        return last_token_pool(model(inputs), inputs["attention_mask"])


@pytest.mark.parametrize("use_dora", [False, True])
def test_save_load_and_merge_give_the_same_embeddings(vocab, tmp_path, use_dora):
    proc = qwen2vl_tiny_processor(vocab, image_size=56)
    inputs = proc([f"{proc.image_token} a red digit", "a blue digit"], [[Image.new("RGB", (32, 32), "red")], []])
    base = embed(tiny_qwen2vl(vocab), inputs)

    spec = LoraSpec(rank=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj", "o_proj"], use_dora=use_dora)
    torch.manual_seed(0)
    tuned = apply_lora(tiny_qwen2vl(vocab), spec)
    trainable = [n for n, p in tuned.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # gaussian init leaves B = 0: give the adapters a value so they change the output
        for n, p in tuned.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    adapted = embed(tuned, inputs)
    assert (adapted - base).abs().max() > 1e-3

    save_adapters(tuned, str(tmp_path / "adapters"))
    assert (tmp_path / "adapters" / "adapter_model.safetensors").is_file()
    reloaded = load_adapters(tiny_qwen2vl(vocab), str(tmp_path / "adapters"))
    torch.testing.assert_close(embed(reloaded, inputs), adapted, atol=1e-6, rtol=1e-5)

    merged = merge_adapters(tuned)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(embed(merged, inputs), adapted, atol=1e-5, rtol=1e-4)
