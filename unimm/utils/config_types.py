"""Type checks of the numeric settings, before anything is built.

The config tree has no schema (Hydra accepts ``data.batch_size=abc``); without this check a wrong type surfaces
as a ``TypeError`` deep inside a DataLoader or an optimizer. Keys are recognised by name, wherever they sit in
the tree, so an experiment's own keys (``model.loss.num_classes``) are checked too.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from unimm.utils.errors import UserError

INT_KEYS = frozenset({
    "batch_size", "eval_batch_size", "num_workers", "seed", "max_epochs", "max_steps", "min_epochs", "min_steps",
    "accumulate_grad_batches", "log_every_n_steps", "num_nodes", "shuffle_buffer", "warmup_steps", "total_steps",
    "every_n_train_steps", "every_n_epochs", "save_top_k", "max_length", "num_classes", "chunk_size",
    "eval_sort_window", "num_sanity_val_steps",
})
FLOAT_KEYS = frozenset({
    "lr", "fusion_lr", "weight_decay", "temperature", "gradient_clip_val", "max_skipped_fraction", "sample_rate",
    "margin", "scale", "eps", "momentum", "warmup_ratio", "min_lr", "label_smoothing",
})
INT_SUFFIXES = ("_batch_size", "_steps", "_epochs")
FLOAT_SUFFIXES = ("_lr",)


def expected_type(key: str) -> type | None:
    """``int``, ``float`` or None (not a known numeric key) for a config key name."""
    if key in INT_KEYS or key.endswith(INT_SUFFIXES):
        return int
    if key in FLOAT_KEYS or key.endswith(FLOAT_SUFFIXES):
        return float
    return None


def type_errors(cfg: DictConfig | ListConfig, prefix: str = "", skip: tuple[str, ...] = ("hydra",)) -> list[str]:
    """One message per known numeric key whose value is not a number (null is allowed: "not set")."""
    errors: list[str] = []
    if not isinstance(cfg, DictConfig):
        return errors
    for key in cfg.keys():
        path = f"{prefix}{key}"
        if path in skip or OmegaConf.is_missing(cfg, key):
            continue
        node = cfg._get_node(key)
        if isinstance(node, (DictConfig, ListConfig)):
            if not node._is_interpolation() and not node._is_none():
                errors += type_errors(node, path + ".", skip)
            continue
        want = expected_type(str(key))
        if want is None:
            continue
        try:
            value: Any = cfg[key]
        except Exception:  # noqa: BLE001 - an interpolation resolvable only at run time (${hydra:...}) is not ours to judge
            continue
        ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
        if want is int and isinstance(value, float) and not value.is_integer():
            ok = False
        if not ok:
            kind = "an integer" if want is int else "a number"
            errors.append(f"{path}={value!r} is not {kind}")
    return errors


def check_value_types(cfg: DictConfig) -> None:
    """Raise a :class:`UserError` naming every numeric key whose value has the wrong type."""
    errors = type_errors(cfg)
    if errors:
        raise UserError("wrong value type: " + "; ".join(errors) + " (e.g. data.batch_size=64, model.optimizer.lr=1e-4)")
