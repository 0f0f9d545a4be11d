"""Released MLCD vision towers (``DeepGlint-AI/mlcd-vit-*`` Hugging Face folders) into a built
:class:`~unimm.models.vit.PooledVisionEncoder`, strictly.

The folder holds ``config.json`` and ``model.safetensors`` (or shards with ``model.safetensors.index.json``) of a
transformers vision model: ``mlcd_vision_model`` (RoPE2D: ``mlcd-vit-bigG-patch14-*``) or ``clip_vision_model``
(``mlcd-vit-large-patch14-336``). Its keys are transformers' own (``vision_model.*``), so the map is the identity:
the loader checks that the folder's ``model_type`` is the encoder's, that every key is one of the encoder's and
every one of the encoder's is in the folder, with the same shapes, and casts to the encoder's dtypes
(``report.cast``). Nothing is dropped.
"""

from __future__ import annotations

import json
from pathlib import Path

from unimm.checkpoints.report import LoadReport, read_safetensors_folder, strict_fit


def load_hf_vision_folder(encoder, path: str | Path) -> LoadReport:
    """Load the folder at ``path`` into ``encoder.model`` (a transformers vision model); returns the report."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no Hugging Face vision folder at {path}: expected {config_file} and weights")
    model = encoder.model
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != model.config.model_type:
        raise ValueError(f"{config_file} has model_type {model_type!r} but the encoder is {model.config.model_type!r}; "
                         "pick the encoder config of that type (conf/model/encoder/mlcd_*.yaml)")
    report = LoadReport(source=str(path), loader="unimm.checkpoints.hf_vision.load_hf_vision_folder")
    state = read_safetensors_folder(path)
    report.mapped.update({k: k for k in state})
    model.load_state_dict(strict_fit(state, model.state_dict(), report, f"vision folder {path}"), strict=True)
    return report


def load_mlcd_released(module, path: str | Path) -> LoadReport:
    """The ``pretrained`` loader of the MLCD experiments: the folder into ``module.encoder`` of a
    :class:`~unimm.methods.cluster_disc.ClusterDiscModule`; the PartialFC class centres keep their initialisation."""
    report = load_hf_vision_folder(module.encoder, path)
    report.kept.update({f"loss.{k}": "class centres: not in the released vision folder"
                        for k in module.loss.state_dict()})
    return report
