"""Human-readable results: Markdown tables laid out like the papers', metrics.json, retrieval example grids."""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from unimm.data.records import Item

GREEN, RED, GREY, WHITE = (40, 160, 60), (200, 40, 40), (150, 150, 150), (255, 255, 255)
BORDER = 4


def markdown_table(
    rows: Sequence[str], columns: Sequence[str], values: dict[tuple[str, str], float | None], title: str | None = None,
    average_row: bool = True, fmt: str = "{:.1f}",
) -> str:
    """Rows = task / dataset, columns = metrics or models; missing cells print as "–".

    The Average row averages each column over the rows that have a value in that column.
    """
    def cell(v):
        return "–" if v is None else fmt.format(v)

    lines = [f"**{title}**", ""] if title else []
    lines.append("| " + " | ".join(["", *columns]) + " |")
    lines.append("|" + "---|" * (len(columns) + 1))
    for row in rows:
        lines.append("| " + " | ".join([row, *[cell(values.get((row, c))) for c in columns]]) + " |")
    if average_row and rows:
        avgs = []
        for c in columns:
            present = [values[(r, c)] for r in rows if values.get((r, c)) is not None]
            avgs.append(sum(present) / len(present) if present else None)
        lines.append("| " + " | ".join(["**Average**", *[cell(v) for v in avgs]]) + " |")
    return "\n".join(lines)


def write_metrics_json(path: str | os.PathLike, metrics: dict) -> None:
    """Write ``metrics`` as JSON atomically (a reader never sees a half-written file)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _tile(item: Item, size: int, border: tuple[int, int, int]) -> Image.Image:
    """One candidate or query as a ``size`` x ``size`` tile: the image (fitted) and/or its text, framed."""
    tile = Image.new("RGB", (size, size), border)
    inner = Image.new("RGB", (size - 2 * BORDER, size - 2 * BORDER), WHITE)
    draw = ImageDraw.Draw(inner)
    font = ImageFont.load_default()
    text_h = 0
    if item.text:
        lines = textwrap.wrap(item.text, width=max(8, inner.width // 6))[: 8 if item.image is None else 3]
        text_h = 11 * len(lines) + 2
        y0 = inner.height - text_h if item.image is not None else 2
        for i, line in enumerate(lines):
            draw.text((2, y0 + 11 * i), line, fill=(0, 0, 0), font=font)
    if item.image is not None:
        box = (inner.width, max(8, inner.height - text_h))
        image = item.image.copy()
        image.thumbnail(box, Image.Resampling.NEAREST if max(image.size) < box[0] else Image.Resampling.BICUBIC)
        if max(image.size) < min(box):  # small images (toy digits) are scaled up to be visible
            scale = min(box) // max(image.size)
            image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
        inner.paste(image, ((inner.width - image.width) // 2, (box[1] - image.height) // 2))
    tile.paste(inner, (BORDER, BORDER))
    return tile


def retrieval_grid(rows: Sequence[tuple[Item, Sequence[Item], Sequence[bool]]], tile: int = 128, max_rows: int = 8) -> Image.Image:
    """One row per query: the query tile (grey frame), then its top-k candidates (green = relevant, red = not).

    Returns an image of width ``tile * (1 + k) + gap`` and height ``tile * rows``.
    """
    rows = list(rows)[:max_rows]
    k = max((len(c) for _, c, _ in rows), default=0)
    gap = tile // 4
    grid = Image.new("RGB", (tile * (1 + k) + gap, tile * max(1, len(rows))), WHITE)
    for r, (query, cands, relevant) in enumerate(rows):
        grid.paste(_tile(query, tile, GREY), (0, r * tile))
        for c, (cand, rel) in enumerate(zip(cands, relevant)):
            grid.paste(_tile(cand, tile, GREEN if rel else RED), (tile + gap + c * tile, r * tile))
    return grid
