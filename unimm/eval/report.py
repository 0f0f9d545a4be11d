"""Human-readable results: Markdown tables laid out like the papers', metrics.json, retrieval example grids."""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from unimm.data.records import Item

GREEN, RED, GREY, WHITE, BLACK = (40, 160, 60), (200, 40, 40), (150, 150, 150), (255, 255, 255), (0, 0, 0)
BORDER = 4  # frame width of a tile, in pixels
MISSING = "–"  # en dash, as in the papers' tables


def markdown_table(
    rows: Sequence[str],
    columns: Sequence[str],
    values: dict[tuple[str, str], float | None],
    title: str | None = None,
    average_row: bool = True,
    fmt: str = "{:.1f}",
    average_over: str = "complete_rows",
    row_header: str = "",
) -> str:
    """A Markdown table: ``rows`` (task / dataset) by ``columns`` (models or metrics).

    Args:
        values: ``(row, column) -> value``; absent keys and None print as "–".
        title: printed in bold above the table.
        average_row: append an Average row.
        average_over: ``"complete_rows"`` (default): every column is averaged over the same rows, those with a
            value in *every* column, so the averages of different models are comparable; when some rows are
            left out the label says how many were used, e.g. "Average (2/3 rows)". ``"each_column"``: each
            column over its own rows with a value (for metric columns that exist only for some datasets).
            A column with no row to average prints "–".
        fmt: format of the numbers.
        row_header: text of the top-left header cell.
    """
    if average_over not in ("complete_rows", "each_column"):
        raise ValueError(f"average_over must be 'complete_rows' or 'each_column', got {average_over!r}")

    def line(cells) -> str:
        return "| " + " | ".join(cells) + " |"

    def cell(v) -> str:
        return MISSING if v is None else fmt.format(v)

    out = [f"**{title}**", ""] if title else []
    out += [line([row_header, *columns]), "|---|" + "---:|" * len(columns)]
    out += [line([r, *[cell(values.get((r, c))) for c in columns]]) for r in rows]
    if average_row and rows:
        complete = [r for r in rows if all(values.get((r, c)) is not None for c in columns)]
        label = "**Average**"
        if average_over == "complete_rows" and len(complete) < len(rows):
            label = f"**Average ({len(complete)}/{len(rows)} rows)**"
        avgs = []
        for c in columns:
            used = complete if average_over == "complete_rows" else [r for r in rows if values.get((r, c)) is not None]
            avgs.append(sum(values[(r, c)] for r in used) / len(used) if used else None)
        out.append(line([label, *[cell(v) for v in avgs]]))
    return "\n".join(out)


def write_metrics_json(path: str | os.PathLike, metrics: dict) -> None:
    """Write ``metrics`` as JSON (sorted keys, indent 2) atomically: a reader sees the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same directory, so os.replace is atomic
    try:
        with open(tmp, "w") as f:
            json.dump(metrics, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _tile(item: Item, size: int, border: tuple[int, int, int]) -> Image.Image:
    """One query or candidate as a ``size`` x ``size`` tile framed in ``border``: the image fitted in, and its
    text wrapped below it (or alone when there is no image)."""
    tile = Image.new("RGB", (size, size), border)
    inner = Image.new("RGB", (size - 2 * BORDER, size - 2 * BORDER), WHITE)
    draw = ImageDraw.Draw(inner)
    font = ImageFont.load_default()
    line_h = font.getbbox("Ag")[3] + 2
    text_h = 0
    if item.text:
        char_w = max(1.0, font.getlength("abcdefghijklmnopqrstuvwxyz") / 26)
        max_lines = max(1, (inner.height // line_h) // (3 if item.image is not None else 1))
        lines = textwrap.wrap(item.text, width=max(4, int((inner.width - 4) / char_w)))
        if len(lines) > max_lines:
            lines = lines[:max_lines]
            lines[-1] = lines[-1][:-1] + "…"
        text_h = line_h * len(lines)
        y0 = inner.height - text_h if item.image is not None else 2
        for i, text in enumerate(lines):
            draw.text((2, y0 + line_h * i), text, fill=BLACK, font=font)
    if item.image is not None:
        box_w, box_h = inner.width, max(8, inner.height - text_h)
        w, h = item.image.size
        scale = min(box_w / w, box_h / h)
        # nearest keeps small images (toy digits) crisp when blown up; bicubic for photos being shrunk
        image = item.image.convert("RGB").resize(
            (max(1, int(w * scale)), max(1, int(h * scale))),
            Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BICUBIC)
        inner.paste(image, ((box_w - image.width) // 2, (box_h - image.height) // 2))
    tile.paste(inner, (BORDER, BORDER))
    return tile


def grid_title(benchmark: str, task: str, module, step: str | int | None) -> str:
    """The title line of an example grid: benchmark, task, model, step (e.g. ``toy · it2i / toy · UniIRModule
    (CLIPModel) · step276``)."""
    model = type(module).__name__
    encoder = getattr(module, "encoder", None)
    if encoder is not None and type(encoder).__name__ != model:
        model += f" ({type(encoder).__name__})"
    step = f"step {step}" if isinstance(step, int) else (step or "step ?")
    return " · ".join([benchmark, task, model, step])


def _text_lines(lines: Sequence[str], width: int, height: int) -> Image.Image:
    """A white strip ``width`` x ``height`` with ``lines`` of text, cut with "…" at the right edge."""
    font = ImageFont.load_default()
    strip = Image.new("RGB", (width, height), WHITE)
    pen = ImageDraw.Draw(strip)
    line_h = font.getbbox("Ag")[3] + 2
    for i, text in enumerate(lines):
        while text and font.getlength(text) > width - 4:
            text = text[:-2] + "…"
        pen.text((2, 2 + i * line_h), text, fill=BLACK, font=font)
    return strip


def retrieval_grid(rows: Sequence[tuple[Item, Sequence[Item], Sequence[bool]]], tile: int = 128,
                   max_rows: int = 8, title: str | None = None, notes: Sequence[str | None] | None = None
                   ) -> Image.Image:
    """Retrieval examples for a person to look at: one row per query (at most ``max_rows``).

    Each row is the query tile (grey frame), a gap of ``tile // 4`` white pixels, then its top-k candidates
    best first (green frame = relevant, red = not). Tiles are ``tile`` x ``tile`` with a ``BORDER``-pixel frame.

    Args:
        rows: ``(query, candidates, relevant)`` with ``len(candidates) == len(relevant)``.
        title: a header line above the rows (benchmark, task, model, step: :func:`grid_title`).
        notes: per row, text kept off the query tile (the task instruction, so that the tile shows the query's own
            text): one header line ``instruction: ...`` when every row has the same note, else a line under each row.
    Returns:
        An RGB image of width ``tile * (1 + k) + tile // 4`` (k the longest candidate list) and height
        ``tile * n_rows`` plus one text line per header line and per row note.
    """
    if tile < 4 * BORDER:
        raise ValueError(f"tile must be at least {4 * BORDER} pixels, got {tile}")
    rows = list(rows)[:max_rows]
    notes = list(notes or [])[: len(rows)]
    k = max((len(c) for _, c, _ in rows), default=0)
    gap = tile // 4
    width = tile * (1 + k) + gap
    line_h = ImageFont.load_default().getbbox("Ag")[3] + 4
    shared = notes[0] if notes and all(n == notes[0] for n in notes) else None
    header = ([title] if title else []) + ([f"instruction: {shared}"] if shared else [])
    per_row = bool(notes) and shared is None and any(notes)
    row_h = tile + (line_h if per_row else 0)
    top = line_h * len(header)
    grid = Image.new("RGB", (width, top + row_h * max(1, len(rows))), WHITE)
    if header:
        grid.paste(_text_lines(header, width, top), (0, 0))
    for r, (query, cands, relevant) in enumerate(rows):
        if len(cands) != len(relevant):
            raise ValueError(f"row {r}: {len(cands)} candidates but {len(relevant)} relevance flags")
        y = top + r * row_h
        grid.paste(_tile(query, tile, GREY), (0, y))
        for c, (cand, rel) in enumerate(zip(cands, relevant, strict=True)):
            grid.paste(_tile(cand, tile, GREEN if rel else RED), (tile + gap + c * tile, y))
        if per_row and notes[r]:
            grid.paste(_text_lines([f"instruction: {notes[r]}"], width, line_h), (0, y + tile))
    return grid


def publish(output_dir: str | os.PathLike, stem: str, table: str, metrics: dict, logger=None) -> None:
    """Write ``<stem>.md`` and ``metrics.json`` into ``output_dir``, print the table, send metrics to the logger."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{stem}.md").write_text(table + "\n")
    write_metrics_json(output_dir / "metrics.json", metrics)
    print(table)
    if logger is not None:
        logger.log_metrics(metrics)
