"""Loading the released VLMo checkpoints and BEiT image-side initialisations into :class:`~unimm.models.vlmo.VLMo`.

Official layout (``vlmo_module.py``; see the spec's checkpoint key list) -> ours, by an explicit map:

=====================================================  ==============================================
official                                               ours
=====================================================  ==============================================
``transformer.*``, ``text_embeddings.*``,              same
``token_type_embeddings.weight``
``relative_position_bias_table``                       ``relative_position.table``
``pooler.dense.*``                                     ``heads.pooler.dense.*``
``itc_{image,text,vl_image,vl_text}_proj.fc.weight``   ``heads.itc.{image,text,vl_image,vl_text}.weight``
``logit_scale``, ``logit_vl_scale``                    ``heads.itc.logit_scale``, ``heads.itc.logit_vl_scale``
``itm_score.fc.*``                                     ``heads.itm.*``
``mlm_score.{transform.*, decoder.weight, bias}``      ``heads.mlm.{transform.*, decoder.weight, bias}``
``vqa_classifier.{0,1,3}.*``                           ``heads.vqa.{0,1,3}.*``
``nlvr2_classifier.{0,1,3}.*``                         ``heads.nlvr2.{0,1,3}.*``
``relative_position.table``, ``heads.*`` (ours)        same (a unimm stage's run checkpoint)
=====================================================  ==============================================

Dropped (stale buffers, rebuilt from the config): ``relative_position_index``, ``text_relative_position_index``,
``text_imag_relative_position_index``, ``text_embeddings.position_ids``, ``text_embeddings.token_type_ids``.
``text_embeddings.position_embeddings.weight`` is truncated to the configured ``max_text_len`` (stage-2
checkpoints have 196 positions, stage 3 uses 40). Image positions of a checkpoint trained at another resolution
(224 px -> 384 / 480 px fine-tuning) are interpolated as the official ``load_pretrained_weight``. Every other key must map onto a parameter of the model, and
every parameter must be loaded unless its path is listed in ``allow_missing`` (e.g. ``mlp_vl`` of a stage-2
checkpoint, or a new VQA head); anything else is an error listing the keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from unimm.checkpoints.io import load_checkpoint
from unimm.checkpoints.report import LoadReport, rename_by_rules
from unimm.models.vlmo import VLMo, VLMoConfig
from unimm.models.vlmo.interpolate import interpolate_pos_embed, interpolate_relative_table

WRAPPER_KEYS = ("state_dict", "module", "model")
STALE_KEYS = frozenset({
    "relative_position_index", "text_relative_position_index", "text_imag_relative_position_index",
    "text_embeddings.position_ids", "text_embeddings.token_type_ids",
})
# (official regex, our replacement); the first match wins, keys matching none are unexpected.
OFFICIAL_TO_OURS: tuple[tuple[str, str], ...] = (
    (r"^(transformer\..+)$", r"\1"),
    (r"^(text_embeddings\.(word_embeddings|position_embeddings|token_type_embeddings|LayerNorm)\..+)$", r"\1"),
    (r"^token_type_embeddings\.weight$", "token_type_embeddings.weight"),
    (r"^relative_position_bias_table$", "relative_position.table"),
    (r"^pooler\.dense\.(weight|bias)$", r"heads.pooler.dense.\1"),
    (r"^itc_(image|text|vl_image|vl_text)_proj\.fc\.weight$", r"heads.itc.\1.weight"),
    (r"^(logit_scale|logit_vl_scale)$", r"heads.itc.\1"),
    (r"^itm_score\.fc\.(weight|bias)$", r"heads.itm.\1"),
    (r"^mlm_score\.(transform\..+|decoder\.weight|bias)$", r"heads.mlm.\1"),
    (r"^vqa_classifier\.([013]\.(weight|bias))$", r"heads.vqa.\1"),
    (r"^nlvr2_classifier\.([013]\.(weight|bias))$", r"heads.nlvr2.\1"),
    (r"^(relative_position\.table|heads\..+)$", r"\1"),  # our own layout (a unimm stage's run checkpoint)
)
POSITION_KEY = "text_embeddings.position_embeddings.weight"
TABLE_KEY = "relative_position.table"
SCALE_KEYS = ("heads.itc.logit_scale", "heads.itc.logit_vl_scale")
POS_EMBED_KEY = "transformer.pos_embed"


def unwrap_state_dict(ckpt: Mapping) -> dict[str, torch.Tensor]:
    """The state dict of a released checkpoint: raw, or under ``state_dict`` / ``module`` / ``model``.

    DeepSpeed (``module``) keys lose their ``module.`` prefix, as the official ``convert_deepspeed_ckpt``; the
    ``encoder.`` prefix of a unimm run checkpoint (``last.ckpt`` of an earlier stage) is removed too.
    """
    for key in WRAPPER_KEYS:
        if key in ckpt and isinstance(ckpt[key], Mapping):
            inner = dict(ckpt[key])
            if key == "module":
                inner = {k.removeprefix("module."): v for k, v in inner.items()}
            if inner and all(k.startswith("encoder.") for k in inner):  # a unimm VLMoModule Lightning checkpoint
                inner = {k.removeprefix("encoder."): v for k, v in inner.items()}
            return inner
    return dict(ckpt)


def map_official_key(key: str) -> str | None:
    """Our name for an official key, or None when no rule matches."""
    return rename_by_rules(key, OFFICIAL_TO_OURS)


def convert_official_state_dict(state: Mapping[str, torch.Tensor], max_text_len: int, num_token_types: int = 2,
                                patch_grid: int | None = None,
                                max_text_len_of_initckpt: int = 196) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Official VLMo keys -> ours (see the module docstring). Raises on keys no rule maps.

    A 2-row ``token_type_embeddings`` loaded into an NLVR2 model (3 types) gets row 2 copied from row 1, as the
    official NLVR2 fine-tuning does. ``logit_scale``/``logit_vl_scale`` (0-dim in the file) become shape ``[1]``.
    With ``patch_grid`` (patches per side of the target model) a checkpoint trained at another resolution has its
    image positions resized (:mod:`unimm.models.vlmo.interpolate`): the relative table's patch rows
    (``max_text_len_of_initckpt`` fixes the number of other rows) or the absolute ``transformer.pos_embed``.
    """
    report = LoadReport()
    out, unexpected = {}, []
    for key, value in state.items():
        if key in STALE_KEYS:
            report.dropped[key] = "stale buffer, rebuilt from the config"
            continue
        ours = map_official_key(key)
        if ours is None:
            unexpected.append(key)
            continue
        if ours == POSITION_KEY and value.shape[0] > max_text_len:
            value = report.note_reshape(key, value, value[:max_text_len])  # the configured max_text_len
        if ours in SCALE_KEYS:
            value = report.note_reshape(key, value, value.reshape(1))  # 0-dim in the file, [1] here
        if patch_grid is not None and ours in (TABLE_KEY, POS_EMBED_KEY):
            value = _resize_image_positions(key, ours == POS_EMBED_KEY, value, patch_grid, max_text_len_of_initckpt, report)
        if ours == "token_type_embeddings.weight" and value.shape[0] < num_token_types:
            extra = value[1:2].expand(num_token_types - value.shape[0], -1)
            value = report.note_reshape(key, value, torch.cat([value, extra]))  # NLVR2's third type = row 1
        report.mapped[key] = ours
        out[ours] = value
    if unexpected:
        raise KeyError(f"{len(unexpected)} checkpoint keys have no mapping onto VLMo: {sorted(unexpected)[:20]}")
    return out, report


def _resize_image_positions(key: str, absolute: bool, value: torch.Tensor, grid: int, text_span: int,
                            report: LoadReport) -> torch.Tensor:
    """Relative table or absolute ``pos_embed`` of the checkpoint resized to a ``grid x grid`` patch model."""
    if absolute:
        new = interpolate_pos_embed(value, grid)
    else:
        num_extra = 3 + 2 + 2 * text_span  # image CLS rows, text<->image rows, text rows (RelativePositionBias)
        src = ((value.shape[0] - num_extra) ** 0.5 + 1) / 2
        if src != int(src):
            raise ValueError(f"{key} {tuple(value.shape)} does not fit max_text_len_of_initckpt={text_span}")
        new = interpolate_relative_table(value, int(src), grid, num_extra)
    return report.note_reshape(key, value, new)


def load_state_into(model: VLMo, state: Mapping[str, torch.Tensor], allow_missing: Iterable[str], report: LoadReport) -> LoadReport:
    """Strict load of our-layout ``state``; model keys whose path starts with an ``allow_missing`` entry may be absent."""
    allow = tuple(allow_missing)
    expected = model.state_dict()
    wrong_shape = [f"{k}: {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                   for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    not_allowed = [k for k in missing if not any(k == a or k.startswith(a + ".") for a in allow)]
    if wrong_shape or unexpected or not_allowed:
        raise KeyError(f"checkpoint does not fit the model: shape mismatches {wrong_shape[:10]}, "
                       f"unexpected {unexpected[:10]}, missing {not_allowed[:10]} (allow_missing={list(allow)})")
    model.load_state_dict({k: report.cast_to(k, v, expected[k]) for k, v in state.items()}, strict=False)
    report.mapped.update({k: k for k in state if k not in report.mapped.values()})  # BEiT's merged table
    report.kept.update({k: "not in the checkpoint (allow_missing)" for k in missing})
    return report


def load_official_vlmo(model: VLMo, path: str | Path, allow_missing: Iterable[str] = ()) -> LoadReport:
    """Load a released VLMo checkpoint (``.pt``) from a local path into ``model``.

    Args:
        model: built from the config that matches the checkpoint (size, ``vlffn_start_layer``, heads).
        path: the local file, e.g. ``vlmo_base_patch16_224.pt`` (loaded into a 384 / 480 px model, its image
            positions are interpolated).
        allow_missing: our parameter paths the checkpoint may lack (prefixes, e.g. ``heads.vqa`` for a new
            VQA head; ``transformer.blocks.10.mlp_vl`` ... for a stage-2 checkpoint).
    """
    c = model.config
    state, report = convert_official_state_dict(unwrap_state_dict(load_checkpoint(path)), c.max_text_len,
                                                c.num_token_types, c.patch_grid, c.max_text_len_of_initckpt)
    report.source, report.loader = str(path), "unimm.checkpoints.vlmo.load_official_vlmo"
    return load_state_into(model, state, allow_missing, report)


def convert_beit_state_dict(beit: Mapping[str, torch.Tensor], model: VLMo) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """BEiT (``beit_base_patch16_224_pt22k_ft22kto1k.pth``) -> VLMo image side, as ``convert_to_textpt_ckpt``.

    ``blocks.N.mlp.*`` -> ``transformer.blocks.N.mlp_imag.*``, ``blocks.N.norm2.*`` -> ``...norm2_imag.*``, other
    backbone keys get the ``transformer.`` prefix; the per-layer ``relative_position_bias_table`` s
    ``[num_image_distances, heads]`` are concatenated along the head axis in layer order into the first rows of
    our shared table (the text rows keep the model's values). Dropped: the classifier ``head.*`` and
    ``fc_norm.*`` (BEiT's mean-pool norm), the pretraining ``mask_token`` and every ``relative_position_index``.
    """
    report = LoadReport()
    out: dict[str, torch.Tensor] = {}
    tables: dict[int, torch.Tensor] = {}
    for key, value in beit.items():
        if key.startswith(("head.", "fc_norm.")) or key == "mask_token" or key.endswith("relative_position_index"):
            report.dropped[key] = "BEiT classifier / pretraining token / stale index, unused by VLMo"
            continue
        m = re.match(r"^blocks\.(\d+)\.attn\.relative_position_bias_table$", key)
        if m:
            tables[int(m.group(1))] = value
            continue
        key = re.sub(r"^(blocks\.\d+)\.mlp\.", r"\1.mlp_imag.", key)
        key = re.sub(r"^(blocks\.\d+)\.norm2\.", r"\1.norm2_imag.", key)
        out[f"transformer.{key}"] = value
    if tables:
        if model.relative_position is None:
            raise KeyError("the BEiT checkpoint has relative position tables but the model uses absolute positions")
        merged = torch.cat([tables[i] for i in sorted(tables)], dim=1)  # [distances, heads * layers]
        table = model.relative_position.table.detach().clone()
        if merged.shape[1] != table.shape[1] or merged.shape[0] > table.shape[0]:
            raise KeyError(f"BEiT relative tables {tuple(merged.shape)} do not fit the model table {tuple(table.shape)}")
        table[: merged.shape[0]] = merged
        out["relative_position.table"] = table
    return out, report


def load_beit_into_vlmo(model: VLMo, path: str | Path) -> LoadReport:
    """Stage 1: initialise the image side (attention, V-FFN, patch embedding, CLS, norms) from a local BEiT file.

    Everything BEiT does not have (text embeddings, L-FFN, VL-FFN, heads, token types) keeps its initial value
    and is listed in ``report.missing``; keys BEiT has that the model lacks are an error.
    """
    state, report = convert_beit_state_dict(unwrap_state_dict(load_checkpoint(path)), model)
    report.source, report.loader = str(path), "unimm.checkpoints.vlmo.load_beit_into_vlmo"
    own = set(model.state_dict())
    beit_side = ("transformer.", "relative_position.")
    allowed = sorted(k for k in own - set(state) if not k.startswith(beit_side) or
                     re.search(r"\.(mlp_text|norm2_text|mlp_vl|norm2_vl)\.", k)
                     or k in ("transformer.pos_embed", "transformer.norm.weight", "transformer.norm.bias"))
    return load_state_into(model, state, allowed, report)


def vlmo_from_checkpoint(config: VLMoConfig, path: str | Path, allow_missing: Iterable[str] = ()) -> VLMo:
    """Build a :class:`VLMo` from ``config`` and load a local checkpoint: a released one (official layout) or an
    earlier unimm stage's ``last.ckpt``; positions are truncated / interpolated to the config (for ``_target_``)."""
    if not path:
        raise ValueError("no VLMo checkpoint to start from: set pretrained.path=<released .pt or a stage's last.ckpt>")
    model = VLMo(config)
    model.load_report = load_official_vlmo(model, path, allow_missing).log()  # returned by report_of_build
    return model


def vlmo_from_beit(config: VLMoConfig, path: str | Path) -> VLMo:
    """Build a :class:`VLMo` from ``config`` with its image side from a local BEiT file (stage 1, for ``_target_``)."""
    model = VLMo(config)
    load_beit_into_vlmo(model, path).log()
    return model


def load_vlmo_released(module, path: str | Path, allow_missing: Iterable[str] = ()) -> LoadReport:
    """The ``pretrained`` loader of the VLMo experiments: a released ``.pt`` (or a unimm stage checkpoint) into
    ``module.encoder`` of a :class:`~unimm.methods.vlmo.VLMoModule`; see :func:`load_official_vlmo`."""
    return load_official_vlmo(module.encoder, path, allow_missing)


def report_of_build(module, path: str | Path) -> LoadReport:
    """The ``pretrained`` loader of the VLMo stage-3 / fine-tuning experiments, whose encoder is built by
    :func:`vlmo_from_checkpoint` from ``pretrained.path`` itself (with the experiment's ``allow_missing``): the
    weights are already loaded, strictly; this returns that load's report instead of loading twice."""
    report = getattr(module.encoder, "load_report", None)
    if report is None or report.source != str(path):
        raise ValueError(f"the VLMo encoder was not built from pretrained.path={path} (model.encoder.path must be "
                         "${pretrained.path}, _target_ unimm.checkpoints.vlmo.vlmo_from_checkpoint)")
    return report
