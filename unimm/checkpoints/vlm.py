"""Released VLM embedders (VLM2Vec, UniMoCo, E5-V): full model folders and LoRA / DoRA adapter folders, loaded
strictly into the backbone of a built :class:`~unimm.methods.vlm_embed.VLMEmbedModule`.

A **full folder** (``TIGER-Lab/VLM2Vec-Full``, ``royokong/e5-v``, a Qwen2-VL / LLaVA-NeXT fine-tune) holds
``model.safetensors`` (or shards + ``model.safetensors.index.json``) in the official layout of its backbone. Its keys
are mapped by the experiment's ``key_map`` (a ``pretrained.loader.key_map`` partial):

- :func:`hf_key` (Qwen2-VL, LLaVA, LLaVA-NeXT), the first candidate our backbone has wins:
  ``model.X`` -> ``X`` (transformers >= 4.52: ``model.language_model.*``, ``model.visual.*``,
  ``model.vision_tower.*``, ``model.multi_modal_projector.*``); ``model.X`` -> ``language_model.X`` (older Qwen2-VL:
  ``model.layers.*``); ``language_model.model.X`` -> ``language_model.X`` (older LLaVA / LLaVA-NeXT); ``X`` -> ``X``
  (older ``visual.*``, ``vision_tower.*``, ``multi_modal_projector.*``, ``image_newline``).
- :func:`phi35v_key` (Phi-3.5-V's remote-code layout): the prefix table of :mod:`unimm.checkpoints.phi35v`.

Dropped: the LM head (``lm_head.weight``, ``language_model.lm_head.weight``: embeddings only) and Phi-3.5-V's
``model.vision_embed_tokens.wte.weight`` (a second name of ``model.embed_tokens.weight``; must equal it). With LoRA
on (``model.lora``), the full weights go to the adapted layers' ``base_layer``, the adapters keep their
initialisation and DoRA magnitudes are recomputed from the loaded weights (``report.kept``); UniMoCo's
completion module is not part of a backbone folder and is kept too.

An **adapter folder** (``TIGER-Lab/VLM2Vec-LoRA``: ``adapter_config.json`` + ``adapter_model.safetensors``, peft's
layout ``base_model.model.<module>.lora_A.weight`` ...) needs ``model.lora`` set to the adapter's settings (rank,
alpha, DoRA: checked against ``adapter_config.json``) and the base weights from ``model.encoder``; module paths are
mapped by the same ``key_map``. Every adapter tensor of the model must be in the file and no other.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import Tensor

from unimm.checkpoints.phi35v import IGNORED_KEYS as PHI_IGNORED
from unimm.checkpoints.phi35v import WTE_ALIAS, official_to_ours
from unimm.checkpoints.report import LoadReport, read_safetensors_folder, rename_by_rules, strict_fit

HF_CANDIDATES: tuple[tuple[str, str], ...] = (
    (r"^model\.(.+)$", r"\1"),
    (r"^model\.(.+)$", r"language_model.\1"),
    (r"^language_model\.model\.(.+)$", r"language_model.\1"),
    (r"^(.+)$", r"\1"),
)
LM_HEADS = frozenset({"lm_head.weight", "language_model.lm_head.weight"})
PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"


def hf_key(key: str, ours: Mapping[str, Tensor]) -> str | None:
    """Our name for a transformers VLM key (see the module docstring), or None when no candidate exists in ``ours``."""
    return rename_by_rules(key, HF_CANDIDATES, accept=lambda name: name in ours)


def phi35v_key(key: str, ours: Mapping[str, Tensor]) -> str | None:
    """Our name for an official Phi-3.5-V key (:func:`unimm.checkpoints.phi35v.official_to_ours`)."""
    return official_to_ours(key)


def _drop_official(state: dict[str, Tensor], report: LoadReport) -> dict[str, Tensor]:
    """Remove the LM head and Phi-3.5-V's duplicate token table, recording why."""
    state = dict(state)
    for key in sorted((LM_HEADS | PHI_IGNORED) & set(state)):
        del state[key]
        report.dropped[key] = "LM head: unused by an embedding model"
    alias, target = WTE_ALIAS
    if alias in state:
        wte = state.pop(alias)
        if target in state and not torch.equal(wte, state[target]):
            raise ValueError(f"{alias} differs from {target}; they are one table in Phi-3.5-V")
        report.dropped[alias] = f"a second name of {target}"
    return state


def _plain_names(model: torch.nn.Module) -> tuple[dict[str, str], dict[str, str]]:
    """``(plain name -> state-dict key, adapter keys -> reason)`` of a backbone model, peft-wrapped or not:
    peft's ``base_model.model.`` prefix and ``.base_layer.`` are removed from the base weights' names."""
    plain, adapters = {}, {}
    for key in model.state_dict():
        if ".lora_" in key:
            adapters[key] = "LoRA adapter: not in a full model folder, keeps its initialisation"
            continue
        plain[key.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")] = key
    return plain, adapters


def load_full_folder(backbone, path: Path, key_map: Callable, report: LoadReport) -> LoadReport:
    """A full model folder into ``backbone.model`` (see the module docstring)."""
    model = backbone.model
    plain, adapters = _plain_names(model)
    ours = model.state_dict()
    plain_state = {name: ours[key] for name, key in plain.items()}
    state, unknown = {}, []
    for key, value in _drop_official(read_safetensors_folder(path), report).items():
        name = key_map(key, plain_state)
        if name is None or name not in plain:
            unknown.append(key)
            continue
        report.mapped[key] = plain[name]
        state[plain[name]] = value
    if unknown:
        raise KeyError(f"{path}: {len(unknown)} keys map onto no parameter of the backbone "
                       f"({type(model).__name__}): {sorted(unknown)[:20]}")
    model.load_state_dict(strict_fit(state, ours, report, f"model folder {path}", kept=adapters), strict=False)
    _refresh_dora_magnitudes(model, report)
    return report


@torch.no_grad()
def _refresh_dora_magnitudes(model: torch.nn.Module, report: LoadReport) -> None:
    """DoRA's magnitude is the row norm of ``W + scale * B A`` taken when peft wrapped the layer: after new base
    weights ``W`` it is recomputed, as peft does at wrapping, so the adapted layer still starts equal to ``W``."""
    for name, module in model.named_modules():
        magnitudes = getattr(module, "lora_magnitude_vector", None)
        if not magnitudes:
            continue
        for adapter, layer in magnitudes.items():
            layer.update_layer(base_layer=module.get_base_layer(), lora_A=module.lora_A[adapter].weight,
                               lora_B=module.lora_B[adapter].weight, scaling=module.scaling[adapter])
            key = f"{name}.lora_magnitude_vector.{adapter}.weight"
            report.kept[key] = "DoRA magnitude: recomputed from the loaded weights (as peft does when it wraps a layer)"


def load_adapter_folder(backbone, path: Path, key_map: Callable, report: LoadReport) -> LoadReport:
    """A peft adapter folder into the LoRA-wrapped ``backbone.model`` (see the module docstring)."""
    model = backbone.model
    if not isinstance(model, PeftModel):
        raise ValueError(f"{path} is a LoRA adapter folder but the model has no adapters: set model.lora to its "
                         f"settings ({json.loads((path / ADAPTER_CONFIG).read_text())})")
    theirs = json.loads((path / ADAPTER_CONFIG).read_text())
    mine = model.peft_config["default"]
    differ = {k: (theirs.get(k), getattr(mine, k)) for k in ("r", "lora_alpha", "use_dora")
              if theirs.get(k, getattr(mine, k)) != getattr(mine, k)}
    if differ:
        raise ValueError(f"{path / ADAPTER_CONFIG} does not match model.lora: {{setting: (file, model)}} {differ}")
    expected = get_peft_model_state_dict(model)  # our adapter keys, without the adapter name
    plain_state = {k.removeprefix(PEFT_PREFIX).replace(".base_layer.", "."): v
                   for k, v in model.state_dict().items() if ".lora_" not in k}
    state, unknown = {}, []
    for key, value in load_file(str(path / "adapter_model.safetensors")).items():
        m = re.match(r"^base_model\.model\.(.+?)\.(lora_[A-Za-z_]+(?:\.weight)?)$", key)
        name = key_map(f"{m.group(1)}.weight", plain_state) if m else None
        if name is None:
            unknown.append(key)
            continue
        ours = f"{PEFT_PREFIX}{name.removesuffix('.weight')}.{m.group(2)}"
        report.mapped[key] = ours
        state[ours] = value
    if unknown:
        raise KeyError(f"{path}: {len(unknown)} adapter keys name no module of the backbone: {sorted(unknown)[:20]}")
    fitted = strict_fit(state, expected, report, f"adapter folder {path}")
    result = set_peft_model_state_dict(model, fitted)
    if result.unexpected_keys:
        raise KeyError(f"peft did not place {result.unexpected_keys[:20]}")
    report.kept["<base weights>"] = "not in an adapter folder: from model.encoder"
    return report


def load_vlm_released(module, path: str | Path, key_map: Callable = hf_key) -> LoadReport:
    """The ``pretrained`` loader of the VLM2Vec / UniMoCo / E5-V experiments: a full model folder or a LoRA adapter
    folder (it has ``adapter_config.json``) into ``module.backbone``; returns the report."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no model or adapter folder at {path}")
    adapter = (path / ADAPTER_CONFIG).is_file()
    name = "load_adapter_folder" if adapter else "load_full_folder"
    report = LoadReport(source=str(path), loader=f"unimm.checkpoints.vlm.{name}")
    load = load_adapter_folder if adapter else load_full_folder
    load(module.backbone, path, key_map, report)
    completion = getattr(module, "completion", None)
    if completion is not None:
        report.kept.update({f"completion.{k}": "UniMoCo completion module: not in a backbone folder"
                            for k in completion.state_dict()})
    return report
