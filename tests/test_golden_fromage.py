"""unimm's FROMAGe against outputs recorded from the official model code (kohjingyu/fromage, tests/golden/fromage/).

Recorded by tests/golden/scripts/fromage.py on a tiny random OPT (with ``<|image|>`` and ``[RET]`` added) and CLIP
vision tower: the backbones (Hugging Face folders), FROMAGe's pruned checkpoint layout (loaded here through
:func:`unimm.checkpoints.frozen_lm.load_fromage`), the captioning prefix, the ``[RET]`` embedding, the scaled visual
embedding, ``main.py``'s loss terms with and without caption concatenation, and the gradients of the total loss
for every trainable part. Tolerance 1e-5 (fp32).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPVisionModelWithProjection, OPTForCausalLM

from unimm.checkpoints.frozen_lm import load_fromage
from unimm.losses import InfoNCE
from unimm.losses.frozen_lm import DualAlignment
from unimm.methods.frozen_llm import FrozenLLMModule
from unimm.models.frozen_lm import FrozenLMEncoder

HERE = Path(__file__).parent / "golden" / "fromage"
G = load_file(str(HERE / "fromage.safetensors"))
INFO = json.loads((HERE / "fromage.json").read_text())
IDS = INFO["ids"]


def _close(ours: torch.Tensor, official: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(ours, official.reshape(ours.shape), rtol=0, atol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> FrozenLMEncoder:
    lm = OPTForCausalLM.from_pretrained(HERE / "opt", local_files_only=True)
    vision = CLIPVisionModelWithProjection.from_pretrained(HERE / "clip_vision", local_files_only=True)
    enc = FrozenLMEncoder(lm, vision, ret_token_id=IDS["ret"], image_token_id=IDS["image"],
                          n_vis=INFO["n_visual_tokens"], embed_dim=INFO["shared_emb_dim"])
    path = tmp_path_factory.mktemp("fromage") / "pretrained_ckpt.pth.tar"
    torch.save({"state_dict": load_file(str(HERE / "pruned_ckpt.safetensors"))}, path)
    return load_fromage(enc, path)


def _caption_batch() -> dict:
    tokens = G["inputs.tokens"]
    mask = (torch.arange(tokens.shape[1])[None, :] < G["inputs.caption_len"][:, None]).long()
    return {"keys": [str(i) for i in range(len(tokens))], "unpaired": 0, "image": G["inputs.pixel_values"],
            "caption": {"input_ids": tokens, "attention_mask": mask}}


def test_embeddings_match_official(encoder):
    batch = _caption_batch()
    with torch.no_grad():
        pooled, projected = encoder.clip_image(batch["image"])
        _close(encoder.prefix_embeddings(pooled), G["plain.prefix_embeddings"], "captioning prefix (visual_embeddings)")
        unified, _ = encoder.unified_embedding(batch["caption"]["input_ids"], batch["caption"]["attention_mask"], None)
        _close(unified, G["plain.ret_embedding"], "[RET] embedding (text_hidden_fcs, normalised)")
        scaled = encoder.logit_scale.exp() * encoder.image_embedding(pooled, projected)
        _close(scaled, G["plain.visual_embs_scaled"], "logit_scale * normalised visual_fc embedding")


@pytest.mark.parametrize("concat", [False, True], ids=["plain", "concat_captions"])
def test_losses_and_gradients_match_official(encoder, concat):
    tag = "concat" if concat else "plain"
    module = FrozenLLMModule(encoder, DualAlignment(InfoNCE(temperature=None, symmetric=True)),
                             optimizer=partial(torch.optim.AdamW, lr=1e-4), concat_captions_prob=float(concat))
    module.zero_grad(set_to_none=True)
    loss, terms = module.compute_loss(_caption_batch())
    assert bool(terms["concat_captions"]) == concat
    _close(terms["caption_lm"], G[f"{tag}.loss.caption_lm"], "captioning LM loss")
    _close(terms["ret_lm"], G[f"{tag}.loss.retrieval_lm"], "retrieval LM loss")
    _close(terms["vm"], G[f"{tag}.loss.contrastive"], "contrastive loss")
    _close(loss.detach(), G[f"{tag}.loss.total"], "total loss")
    loss.backward()
    grads = {"prefix.weight": encoder.prefix.weight, "prefix.bias": encoder.prefix.bias,
             "image_head.weight": encoder.image_head.weight, "image_head.bias": encoder.image_head.bias,
             "text_head.0.weight": encoder.text_head[0].weight, "text_head.0.bias": encoder.text_head[0].bias,
             "logit_scale": encoder.logit_scale}
    for name, p in grads.items():
        _close(p.grad, G[f"{tag}.grad.{name}"], f"gradient of {name}")
    ret = encoder.token_embeddings.grad[IDS["ret"] : IDS["ret"] + 1]
    _close(ret, G[f"{tag}.grad.ret_embedding"], "gradient of the [RET] embedding row")
