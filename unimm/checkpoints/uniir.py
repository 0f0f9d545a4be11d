"""Loading the released UniIR checkpoints (``clip_sf_large.pth``, ``clip_ff_large.pth``, ``blip_sf_large.pth``,
``blip_ff_large.pth``) into :class:`~unimm.methods.uniir.UniIRModule` by an explicit key map.

Official layout (UniIR ``train.py`` ``save_checkpoint``; ``common/utils.py`` loads ``torch.load(path)["model"]``):
``{"model": state_dict, "optimizer", "scheduler", "config" (an OmegaConf object), "epoch", "scaler"}``. Only
``model`` is read. The file is unpickled with ``weights_only=True``; the OmegaConf config and other non-tensor
objects outside ``model`` are read as opaque placeholders, never executed (:func:`read_official_state`).

CLIP (OpenAI CLIP module under ``clip_model.``) -> HF ``CLIPModel`` under ``encoder.``:

===================================================  ===================================================
official                                             ours
===================================================  ===================================================
``clip_model.token_embedding.weight``                ``encoder.text_model.embeddings.token_embedding.weight``
``clip_model.positional_embedding``                  ``encoder.text_model.embeddings.position_embedding.weight``
``clip_model.transformer.resblocks.N.<block>``       ``encoder.text_model.encoder.layers.N.<block>``
``clip_model.ln_final.*``                            ``encoder.text_model.final_layer_norm.*``
``clip_model.text_projection`` ``[W, D]``            ``encoder.text_projection.weight`` ``[D, W]`` (transposed)
``clip_model.logit_scale`` ``[]``                    ``encoder.logit_scale`` ``[1]``
``clip_model.visual.class_embedding``                ``encoder.vision_model.embeddings.class_embedding``
``clip_model.visual.positional_embedding``           ``encoder.vision_model.embeddings.position_embedding.weight``
``clip_model.visual.conv1.weight``                   ``encoder.vision_model.embeddings.patch_embedding.weight``
``clip_model.visual.ln_pre.*`` / ``ln_post.*``       ``encoder.vision_model.pre_layrnorm.*`` / ``post_layernorm.*``
``clip_model.visual.transformer.resblocks.N.<b>``    ``encoder.vision_model.encoder.layers.N.<b>``
``clip_model.visual.proj`` ``[Wv, D]``               ``encoder.visual_projection.weight`` ``[D, Wv]``
``t5_layers.*`` (CLIP_FF)                            ``fusion.t5_layers.*``
===================================================  ===================================================

with ``<block>``: ``attn.in_proj_weight`` / ``in_proj_bias`` split in three -> ``self_attn.{q,k,v}_proj.*``;
``attn.out_proj`` -> ``self_attn.out_proj``; ``ln_1``/``ln_2`` -> ``layer_norm1``/``layer_norm2``; ``mlp.c_fc`` /
``mlp.c_proj`` -> ``mlp.fc1`` / ``mlp.fc2``.

BLIP (BLIP ViT + BERT ``med.py`` names) -> HF ``BlipModel`` under ``encoder.`` (momentum copies ``*_m`` under
``momentum_towers.encoder.``):

===================================================  ===================================================
``visual_encoder{,_m}.cls_token`` / ``pos_embed``    ``vision_model.embeddings.class_embedding`` / ``position_embedding``
``visual_encoder{,_m}.patch_embed.proj.*``           ``vision_model.embeddings.patch_embedding.*``
``visual_encoder{,_m}.blocks.N.norm1/norm2.*``       ``vision_model.encoder.layers.N.layer_norm1/layer_norm2.*``
``visual_encoder{,_m}.blocks.N.attn.qkv/proj.*``     ``vision_model.encoder.layers.N.self_attn.qkv/projection.*``
``visual_encoder{,_m}.blocks.N.mlp.fc1/fc2.*``       ``vision_model.encoder.layers.N.mlp.fc1/fc2.*``
``visual_encoder{,_m}.norm.*``                       ``vision_model.post_layernorm.*``
``text_encoder{,_m}.*`` (same BERT names)            ``text_model.*``
``vision_proj{,_m}.*`` / ``text_proj{,_m}.*``        ``visual_projection.*`` / ``text_projection.*``
``temp`` ``[]``                                      ``loss.temp`` ``[1]``
``query_queue`` / ``cand_queue`` ``[D, Q]``          ``loss.query_queue`` / ``loss.cand_queue`` ``[Q, D]``
``idx_queue`` ``[1, Q]`` / ``new_ptr_queue`` ``[1]`` ``loss.id_queue`` ``[Q]`` / ``loss.queue_ptr`` ``[]``
===================================================  ===================================================

Dropped on purpose: ``text_encoder{,_m}.embeddings.position_ids`` (a stale buffer, rebuilt by the model) and
``t5_layers.embed_tokens.weight`` if present (newer transformers' T5Stack makes one; the stack is fed embeddings).
A module without momentum towers (built with InfoNCE, e.g. for evaluation only) gets no momentum copies, queues
or temperature: those keys are dropped and listed. Every other official key must map onto a tensor of the module
with the same number of elements, and every tensor of the module must be loaded, except the encoder keys its
fusion head declares unused (``fusion.unused_encoder_keys``: CLIP_FF's text projection, BLIP_SF's text pooler,
BLIP_FF's projections, BLIP's ``logit_scale``); anything else is an error naming the keys.

The UniIR experiments load a released file directly with ``pretrained.path=clip_sf_large.pth`` on ``python -m
unimm.eval`` / ``unimm.train`` (:mod:`unimm.checkpoints.released`); ``python -m unimm.checkpoints.uniir
+experiment=uniir_clip_sf_large model.encoder.path=... official=clip_sf_large.pth out=clip_sf_large.ckpt`` writes a
unimm run checkpoint of it instead, which ``python -m unimm.eval ckpt_path=...`` evaluates.
"""

from __future__ import annotations

import pickle
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from unimm.checkpoints.report import LoadReport

MODEL_KEY = "model"
# modules of the non-tensor objects UniIR pickles beside the weights (its OmegaConf config); read as placeholders
OPAQUE_MODULES = ("omegaconf.", "typing.", "builtins.", "collections.")
DROPPED = (r"^text_encoder(_m)?\.embeddings\.position_ids$", r"^t5_layers\.embed_tokens\.weight$")
MOMENTUM_PREFIXES = ("momentum_towers.", "loss.")

_CLIP_BLOCK = {
    "attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
_BLIP_VIT_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
                   "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def _same(t: Tensor, shape: torch.Size) -> list[Tensor]:
    # reshape only ([] -> [1] scalars, [1, Q] -> [Q] id queue); a size mismatch is reported by the caller
    return [t.reshape(shape) if t.numel() == shape.numel() else t]


def _transposed(t: Tensor, shape: torch.Size) -> list[Tensor]:
    return [t.t().contiguous()]


def _split3(t: Tensor, shape: torch.Size) -> list[Tensor]:
    return [c.contiguous() for c in t.chunk(3, dim=0)]  # in_proj = [q; k; v]


@dataclass(frozen=True)
class Rule:
    """Official keys matching ``pattern`` become ``targets`` (``re`` templates) through ``convert``."""

    pattern: str
    targets: tuple[str, ...]
    convert: Callable[[Tensor, torch.Size], list[Tensor]] = _same


def _clip_rules() -> list[Rule]:
    rules = []
    for tower, ours in (("clip_model.transformer", "encoder.text_model.encoder.layers"),
                        ("clip_model.visual.transformer", "encoder.vision_model.encoder.layers")):
        base = rf"^{re.escape(tower)}\.resblocks\.(\d+)\."
        rules.append(Rule(base + r"attn\.in_proj_(weight|bias)$",
                          tuple(rf"{ours}.\1.self_attn.{p}_proj.\2" for p in "qkv"), _split3))
        for official, mine in _CLIP_BLOCK.items():
            rules.append(Rule(base + re.escape(official) + r"\.(weight|bias)$", (rf"{ours}.\1.{mine}.\2",)))
    return rules + [
        Rule(r"^clip_model\.token_embedding\.weight$", ("encoder.text_model.embeddings.token_embedding.weight",)),
        Rule(r"^clip_model\.positional_embedding$", ("encoder.text_model.embeddings.position_embedding.weight",)),
        Rule(r"^clip_model\.ln_final\.(weight|bias)$", (r"encoder.text_model.final_layer_norm.\1",)),
        Rule(r"^clip_model\.text_projection$", ("encoder.text_projection.weight",), _transposed),
        Rule(r"^clip_model\.logit_scale$", ("encoder.logit_scale",)),
        Rule(r"^clip_model\.visual\.class_embedding$", ("encoder.vision_model.embeddings.class_embedding",)),
        Rule(r"^clip_model\.visual\.positional_embedding$",
             ("encoder.vision_model.embeddings.position_embedding.weight",)),
        Rule(r"^clip_model\.visual\.conv1\.weight$", ("encoder.vision_model.embeddings.patch_embedding.weight",)),
        Rule(r"^clip_model\.visual\.ln_pre\.(weight|bias)$", (r"encoder.vision_model.pre_layrnorm.\1",)),
        Rule(r"^clip_model\.visual\.ln_post\.(weight|bias)$", (r"encoder.vision_model.post_layernorm.\1",)),
        Rule(r"^clip_model\.visual\.proj$", ("encoder.visual_projection.weight",), _transposed),
        Rule(r"^t5_layers\.(.+)$", (r"fusion.t5_layers.\1",)),
    ]


def _blip_rules() -> list[Rule]:
    rules = []
    for suffix, ours in (("", "encoder"), ("_m", "momentum_towers.encoder")):
        vit, vis = rf"^visual_encoder{suffix}\.", f"{ours}.vision_model"
        rules += [
            Rule(vit + r"cls_token$", (f"{vis}.embeddings.class_embedding",)),
            Rule(vit + r"pos_embed$", (f"{vis}.embeddings.position_embedding",)),
            Rule(vit + r"patch_embed\.proj\.(weight|bias)$", (rf"{vis}.embeddings.patch_embedding.\1",)),
            Rule(vit + r"norm\.(weight|bias)$", (rf"{vis}.post_layernorm.\1",)),
            Rule(rf"^text_encoder{suffix}\.(.+)$", (rf"{ours}.text_model.\1",)),
            Rule(rf"^vision_proj{suffix}\.(weight|bias)$", (rf"{ours}.visual_projection.\1",)),
            Rule(rf"^text_proj{suffix}\.(weight|bias)$", (rf"{ours}.text_projection.\1",)),
        ]
        for official, mine in _BLIP_VIT_BLOCK.items():
            rules.append(Rule(vit + r"blocks\.(\d+)\." + re.escape(official) + r"\.(weight|bias)$",
                              (rf"{vis}.encoder.layers.\1.{mine}.\2",)))
    return rules + [
        Rule(r"^temp$", ("loss.temp",)),
        Rule(r"^(query|cand)_queue$", (r"loss.\1_queue",), _transposed),
        Rule(r"^idx_queue$", ("loss.id_queue",)),
        Rule(r"^new_ptr_queue$", ("loss.queue_ptr",)),
    ]


RULES: tuple[Rule, ...] = tuple(_clip_rules() + _blip_rules())


# -- reading the file ----------------------------------------------------------------------------------------
class _Opaque:
    """Stands in for a non-tensor object of the checkpoint (UniIR's OmegaConf config): accepts and drops state."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Opaque()

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


def read_official_state(path: str | Path) -> dict[str, Tensor]:
    """The ``model`` state dict of a UniIR checkpoint (a bare state dict is accepted too), read with
    ``weights_only=True``; globals of the modules in ``OPAQUE_MODULES`` become placeholders, any other
    non-allow-listed global is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"UniIR checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        foreign = [g for g in unsafe if not g.startswith(OPAQUE_MODULES)]
        if foreign:
            raise pickle.UnpicklingError(f"{path} pickles objects that are not loaded without running their code: "
                                         f"{foreign}") from None
        with torch.serialization.safe_globals([(_Opaque, g) for g in unsafe]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    state = obj.get(MODEL_KEY, obj) if isinstance(obj, Mapping) else obj
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors under {MODEL_KEY!r}")
    return dict(state)


# -- mapping ---------------------------------------------------------------------------------------------------
def convert_state(official: Mapping[str, Tensor], ours: Mapping[str, Tensor], unused_prefixes: tuple[str, ...] = ()
                  ) -> tuple[dict[str, Tensor], LoadReport]:
    """Map ``official`` onto the keys and shapes of ``ours`` (a module's state dict).

    Raises:
        KeyError: official keys that no rule maps or whose target ``ours`` lacks (unknown), or keys of ``ours``
            not provided and not under ``unused_prefixes`` (missing); the message names them.
        ValueError: a tensor whose size does not fit its target.
    """
    report = LoadReport()
    has_momentum = any(k.startswith("momentum_towers.") for k in ours)
    converted: dict[str, Tensor] = {}
    unknown, sizes = [], []
    for key, tensor in official.items():
        if any(re.match(p, key) for p in DROPPED):
            report.dropped[key] = "stale buffer / unused token table"
            continue
        rule = next((r for r in RULES if re.match(r.pattern, key)), None)
        if rule is None:
            unknown.append(key)
            continue
        targets = [re.sub(rule.pattern, t, key) for t in rule.targets]
        if not has_momentum and all(t.startswith(MOMENTUM_PREFIXES) for t in targets):
            report.dropped[key] = "the module has no momentum towers"
            continue
        if any(t not in ours for t in targets):
            unknown.append(f"{key} -> {[t for t in targets if t not in ours]}")
            continue
        values = rule.convert(tensor, ours[targets[0]].shape)
        for target, value in zip(targets, values):
            if value.shape != ours[target].shape:
                sizes.append(f"{key} {tuple(tensor.shape)} -> {target} {tuple(ours[target].shape)}")
                continue
            converted[target] = report.cast_to(target, value, ours[target])
        if len(values) == 1:  # splits (in_proj -> q, k, v) are a mapping, not a reshape
            report.note_reshape(key, tensor, values[0])
        report.mapped[key] = ", ".join(targets)
    missing = [k for k in ours if k not in converted and not k.startswith(unused_prefixes)]
    if unknown or missing:
        raise KeyError(f"UniIR checkpoint does not match the module: unknown official keys {sorted(unknown)}; "
                       f"module keys not in the checkpoint {sorted(missing)}")
    if sizes:
        raise ValueError(f"UniIR checkpoint tensors do not fit the module: {sizes}")
    report.kept.update({k: "not used by this fusion head (fusion.unused_encoder_keys)"
                        for k in ours if k not in converted})
    return converted, report


def load_uniir_checkpoint(module, path: str | Path) -> LoadReport:
    """Load a released UniIR checkpoint into a :class:`~unimm.methods.uniir.UniIRModule` (in place).

    The module must be built with the matching encoder size and fusion head (and, to load the momentum copies
    and queues, the momentum loss with the checkpoint's queue size).
    """
    unused = getattr(module.fusion, "unused_encoder_keys", ())
    prefixes = tuple(f"{tower}{k}" for tower in ("encoder.", "momentum_towers.encoder.") for k in unused)
    state, report = convert_state(read_official_state(path), module.state_dict(), prefixes)
    module.load_state_dict(state, strict=False)  # completeness was checked above; unused keys keep their values
    report.source, report.loader = str(path), "unimm.checkpoints.uniir.load_uniir_checkpoint"
    return report


def main(argv: list[str] | None = None) -> None:
    """``python -m unimm.checkpoints.uniir +experiment=NAME official=PATH.pth out=PATH.ckpt [overrides]``: build the
    experiment's model, load the official weights and write a checkpoint that ``python -m unimm.eval`` reads."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from unimm.runtime import CONF_DIR
    from unimm.training.callbacks import CONFIG_KEY

    args = list(sys.argv[1:] if argv is None else argv)
    options = dict(a.split("=", 1) for a in args if a.split("=", 1)[0] in ("official", "out"))
    if set(options) != {"official", "out"}:
        raise SystemExit(main.__doc__)
    overrides = [a for a in args if a.split("=", 1)[0] not in ("official", "out")]
    # outside a Hydra app the run-time paths are unset: default them to the working folder and the output's
    defaults = {"paths.root_dir": str(Path.cwd()), "paths.output_dir": str(Path(options["out"]).resolve().parent)}
    given = {a.split("=", 1)[0].lstrip("+") for a in overrides}
    overrides += [f"{k}={v}" for k, v in defaults.items() if k not in given]
    with initialize_config_dir(config_dir=str(Path(CONF_DIR).resolve()), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    module = instantiate(cfg.model)
    report = load_uniir_checkpoint(module, options["official"])
    config = OmegaConf.to_container(cfg, resolve=True)
    Path(options["out"]).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.state_dict(), CONFIG_KEY: config, "global_step": 0}, options["out"])
    print(f"loaded {len(report.loaded)} tensors from {options['official']}; dropped {sorted(report.dropped)}; "
          f"left as built (unused by this fusion) {report.unused}; wrote {options['out']}")


if __name__ == "__main__":
    main()
