"""Released checkpoints by config: ``pretrained.path=<file or folder>`` on ``python -m unimm.train`` / ``unimm.eval``.

Each family's model config pulls one ``conf/pretrained/<family>.yaml`` into the root ``pretrained`` node::

    pretrained:
      path: null                 # the released checkpoint; null = the weights as built
      loader:                    # chosen by _target_: a partial (module, path) -> LoadReport
        _target_: unimm.checkpoints.uniir.load_uniir_checkpoint
        _partial_: true

After the LightningModule is built from ``model``, :func:`apply_pretrained` calls the loader on it. Every loader
is strict (missing / unexpected keys and shape mismatches are errors naming them) and returns a
:class:`~unimm.checkpoints.report.LoadReport`, which is logged at INFO and written to
``<output_dir>/pretrained_load.json``. The README's "Released checkpoints" table lists the loaders.
"""

from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from unimm.checkpoints.report import LoadReport

REPORT_FILE = "pretrained_load.json"


def pretrained_path(cfg: DictConfig) -> str | None:
    """``cfg.pretrained.path``, or None when the config has no released checkpoint set."""
    node = cfg.get("pretrained")
    return node.get("path") if node else None


def apply_pretrained(module, cfg: DictConfig) -> LoadReport | None:
    """Load ``cfg.pretrained.path`` into ``module`` with ``cfg.pretrained.loader``; None when no path is set.

    Raises:
        ValueError: a path is set but the config names no loader.
    """
    path = pretrained_path(cfg)
    if not path:
        return None
    loader_cfg = cfg.pretrained.get("loader")
    if not loader_cfg or "_target_" not in loader_cfg:
        raise ValueError(f"pretrained.path={path} is set but pretrained.loader names no _target_; the experiment's "
                         "model config picks one (conf/pretrained/*.yaml)")
    report = instantiate(loader_cfg)(module, path)
    report.log()
    output_dir = cfg.get("paths", {}).get("output_dir")
    if output_dir:
        report.write(Path(output_dir) / REPORT_FILE)
    return report


def released_run(cfg: DictConfig):
    """A :class:`~unimm.checkpoints.io.LoadedRun` for ``python -m unimm.eval pretrained.path=...``: processor and
    module built from this command's ``processor`` / ``model`` (the experiment), weights from the released file."""
    from unimm.checkpoints.io import LoadedRun

    processor = instantiate(cfg.processor)
    module = instantiate(cfg.model)
    apply_pretrained(module, cfg)
    module.eval()
    return LoadedRun(module, processor, cfg, 0)


def require_ckpt_path(cfg: DictConfig) -> str:
    """``cfg.ckpt_path``; an error naming both choices when neither it nor ``pretrained.path`` is set."""
    if not cfg.get("ckpt_path"):
        raise ValueError("nothing to evaluate: set ckpt_path=<run>/checkpoints/last.ckpt (a unimm run) or "
                         "pretrained.path=<released checkpoint> with +experiment=<its family's experiment>")
    return cfg.ckpt_path
