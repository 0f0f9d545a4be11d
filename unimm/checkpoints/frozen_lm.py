"""Pruned checkpoints of the frozen-LLM family: only the trainable parts, loaded onto frozen backbones.

unimm layout (safetensors or ``torch.save``): the keys of
:meth:`~unimm.models.frozen_lm.FrozenLMEncoder.trainable_state` -- ``prefix.*``, ``text_head.0.*``,
``image_head.*`` (learned image space only), ``logit_scale`` ``[1]`` (0-dim in files written before it became
``[1]``; reshaped on load), ``ret_embedding`` ``[1, D_in]``.

FROMAGe's released layout (``fromage_model/pretrained_ckpt.pth.tar``, written by ``fromage/prune_model_ckpt.py``):
``{"state_dict": {"model.logit_scale" (0-dim), "model.visual_embeddings.{weight,bias}", "model.visual_fc.{weight,bias}",
"model.text_hidden_fcs.0.0.{weight,bias}", "ret_input_embeddings.weight" [1, D]}}``; ``load_fromage`` loads it with
``strict=False`` and copies the [RET] row in. A full ``model.input_embeddings.weight`` may be present (the script
keeps it; the released file does not); only its [RET] row would be meaningful and it is ignored.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from unimm.checkpoints.io import load_checkpoint
from unimm.checkpoints.report import LoadReport
from unimm.models.frozen_lm import FrozenLMEncoder

FROMAGE_DROPPED = {"model.input_embeddings.weight": "the full LM table (prune_model_ckpt.py may keep it): only its "
                                                   "[RET] row could differ from the frozen table; "
                                                   "ret_input_embeddings.weight is that row"}
# FROMAGe key -> unimm key
FROMAGE_KEYS = {
    "model.logit_scale": "logit_scale",
    "model.visual_embeddings.weight": "prefix.weight",
    "model.visual_embeddings.bias": "prefix.bias",
    "model.visual_fc.weight": "image_head.weight",
    "model.visual_fc.bias": "image_head.bias",
    "model.text_hidden_fcs.0.0.weight": "text_head.0.weight",
    "model.text_hidden_fcs.0.0.bias": "text_head.0.bias",
    "ret_input_embeddings.weight": "ret_embedding",
}


def save_pruned(encoder: FrozenLMEncoder, path: str | Path) -> Path:
    """Write the trainable parts to ``path`` (``.safetensors``, else ``torch.save``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous().cpu() for k, v in encoder.trainable_state().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def load_pruned(encoder: FrozenLMEncoder, path: str | Path) -> FrozenLMEncoder:
    """Load a checkpoint written by :func:`save_pruned` (or a pruned Lightning checkpoint) onto ``encoder``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = load_checkpoint(path)
        if "state_dict" in state:  # a pruned Lightning checkpoint: keys "encoder.<name>"
            state = {k.removeprefix("encoder."): v for k, v in state["state_dict"].items()}
    encoder.load_trainable_state(state)
    return encoder


def fromage_state(state_dict: dict[str, torch.Tensor], report: LoadReport | None = None) -> dict[str, torch.Tensor]:
    """Map FROMAGe's pruned ``state_dict`` (``module.`` prefixes tolerated) to unimm's trainable-state keys.

    Raises:
        KeyError: a FROMAGe key is missing, or the file holds a key outside ``FROMAGE_KEYS`` / ``FROMAGE_DROPPED``.
    """
    report = report if report is not None else LoadReport()
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    missing = [k for k in FROMAGE_KEYS if k not in state_dict]
    unexpected = sorted(k for k in state_dict if k not in FROMAGE_KEYS and k not in FROMAGE_DROPPED)
    if missing or unexpected:
        raise KeyError(f"not a FROMAGe pruned checkpoint: missing {missing}, unexpected {unexpected[:20]}")
    report.dropped.update({k: why for k, why in FROMAGE_DROPPED.items() if k in state_dict})
    report.mapped.update(FROMAGE_KEYS)
    return {ours: state_dict[theirs] for theirs, ours in FROMAGE_KEYS.items()}


def load_fromage(encoder: FrozenLMEncoder, path: str | Path) -> FrozenLMEncoder:
    """Load FROMAGe's released pruned checkpoint (``pretrained_ckpt.pth.tar``) onto ``encoder``.

    The encoder must have FROMAGe's shapes: learned image space, ``embed_dim`` = ``shared_emb_dim`` (256),
    ``n_vis`` = ``n_visual_tokens`` of its ``model_args.json``.
    """
    load_fromage_report(encoder, path)
    return encoder


def _load_reported(encoder: FrozenLMEncoder, state: dict[str, torch.Tensor], report: LoadReport) -> LoadReport:
    """Strict load of trainable-state ``state`` with its reshapes and casts recorded; frozen backbones are kept."""
    ours = encoder.trainable_state()
    scale = state["logit_scale"]
    state["logit_scale"] = report.note_reshape("logit_scale", scale, scale.reshape(1))  # 0-dim in FROMAGe's file
    state = {k: report.cast_to(k, v, ours[k]) if k in ours else v for k, v in state.items()}
    encoder.load_trainable_state(state)  # raises on missing / unexpected keys and wrong shapes
    report.kept["<frozen LM and CLIP backbones>"] = "not in pruned checkpoints: built from model.encoder"
    return report


def load_fromage_report(encoder: FrozenLMEncoder, path: str | Path) -> LoadReport:
    """:func:`load_fromage`, returning the :class:`LoadReport`."""
    ckpt = load_checkpoint(path)
    report = LoadReport(source=str(path), loader="unimm.checkpoints.frozen_lm.load_fromage")
    state = fromage_state(ckpt["state_dict"] if "state_dict" in ckpt else ckpt, report)
    return _load_reported(encoder, state, report)


def load_frozen_lm_released(module, path: str | Path) -> LoadReport:
    """The ``pretrained`` loader of the FROMAGe / UNIMUR experiments, into ``module.encoder``.

    FROMAGe's released ``pretrained_ckpt.pth.tar`` is recognised by its keys (``model.visual_embeddings.weight``
    under ``state_dict``); anything else is read as unimm's pruned layout (:func:`save_pruned`, a pruned
    ``last.ckpt``). Either load is strict.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        ckpt = load_checkpoint(path)
        inner = ckpt.get("state_dict", ckpt)
        if any(k.removeprefix("module.") in FROMAGE_KEYS for k in inner):
            return load_fromage_report(module.encoder, path)
        state = {k.removeprefix("encoder."): v for k, v in inner.items()}
    else:
        state = load_file(str(path))
    report = LoadReport(source=str(path), loader="unimm.checkpoints.frozen_lm.load_pruned",
                        mapped={k: k for k in state})
    return _load_reported(module.encoder, state, report)
