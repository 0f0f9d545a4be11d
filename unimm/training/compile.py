"""``model.compile``: regional ``torch.compile`` of every family's repeated transformer blocks.

Why regional: the families call many encoder methods (``encode_text``, ``clip_image``, ``prefix_embeddings``...),
not one ``forward``, so compiling a top-level module would leave most of the step in eager mode. Every backbone
(HF CLIP / BLIP / T5 / OPT / Phi-3 / Qwen2-VL layers, VLMo multiway blocks, MLCD layers) spends its time in a
``nn.ModuleList`` of identical blocks; compiling each block in place (``nn.Module.compile``) covers the training
step and the embedding step of every family, compiles the block code once for all layers, and keeps parameter
names (checkpoints, LoRA, optimizer groups) unchanged.

Fallback: a block that dynamo cannot trace runs eagerly (``torch._dynamo`` graph breaks, or ``suppress_errors``
when ``fallback=True``), and the report says how many blocks were compiled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class CompileSettings:
    """What ``model.compile`` accepts: ``true`` / ``false`` or a mapping with these keys."""

    enabled: bool = False
    backend: str = "inductor"
    mode: str | None = None  # inductor mode: None (default), "reduce-overhead", "max-autotune"
    dynamic: bool | None = None  # None: static first, dynamic after a shape change (text lengths vary)
    fallback: bool = True  # a block that fails to compile runs eagerly instead of stopping the run
    # graphs dynamo keeps per block function before it runs further variants eagerly (torch's default: 8). One
    # block function serves every layer, and VLMo's multiway block runs in more variants than 8 (3 experts x
    # layers with and without the VL expert x static and dynamic shapes); raised, never lowered, process-wide
    recompile_limit: int = 32

    @classmethod
    def parse(cls, value) -> CompileSettings:
        if value is None or isinstance(value, bool):
            return cls(enabled=bool(value))
        if hasattr(value, "items"):
            unknown = set(value) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(f"model.compile: unknown keys {sorted(unknown)}; valid: {sorted(cls.__dataclass_fields__)}")
            return cls(**{"enabled": True, **dict(value)})
        raise ValueError(f"model.compile={value!r}: expected true, false or a mapping of {sorted(cls.__dataclass_fields__)}")


@dataclass
class CompileReport:
    compiled: list[str] = field(default_factory=list)  # dotted names of the compiled blocks

    def __str__(self) -> str:
        return f"torch.compile: {len(self.compiled)} blocks" + (f" ({self.compiled[0]} ...)" if self.compiled else "")


def repeated_blocks(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every child of an ``nn.ModuleList`` whose children all share one class: the transformer layers.

    Nested lists are not descended into once a list qualifies (a layer's own sub-lists are compiled with it).
    """
    found: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, m: nn.Module) -> None:
        for name, child in m.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if isinstance(child, nn.ModuleList) and len(child) > 0 and len({type(c) for c in child}) == 1:
                found.extend((f"{path}.{i}", block) for i, block in enumerate(child))
            else:
                visit(path, child)

    visit("", module)
    return found


def compile_blocks(module: nn.Module, settings: CompileSettings) -> CompileReport:
    """Compile the repeated blocks of ``module`` in place; returns which ones."""
    report = CompileReport()
    if not settings.enabled:
        return report
    if settings.fallback:
        torch._dynamo.config.suppress_errors = True  # a block dynamo cannot compile runs eagerly, with a warning
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, settings.recompile_limit)
    for name, block in repeated_blocks(module):
        block.compile(backend=settings.backend, mode=settings.mode, dynamic=settings.dynamic)
        report.compiled.append(name)
    if not report.compiled:
        log.warning("model.compile=true but %s has no repeated blocks to compile; running eagerly", type(module).__name__)
    else:
        log.info("%s", report)
    return report
