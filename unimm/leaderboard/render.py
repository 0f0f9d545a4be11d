"""The leaderboard as Markdown, CSV and one static HTML page (sortable, filterable; plain JS, no CDN, file://)."""

from __future__ import annotations

import csv
import datetime as _dt
import html
import json
import os
from pathlib import Path

from unimm.leaderboard.gather import Board, Row

MISSING = "–"
STATIC = Path(__file__).with_name("static")


def _fmt(value: float | None) -> str:
    return MISSING if value is None else f"{value:.1f}"


def _family(board: Board, row: Row) -> str:
    return board.families.get(row.family, row.family)


def markdown(board: Board) -> str:
    """Two tables with the same columns: measured runs (best per column in bold), then the reported rows with
    their sources; the reported rows never take part in "best"."""
    best = board.best()
    head = ["model", "family", *[c.label for c in board.columns]]

    def table(rows: list[Row], mark: bool) -> list[str]:
        out = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * len(board.columns)]
        for row in rows:
            cells = []
            for col in board.columns:
                v = row.cells.get(col.key)
                text = _fmt(v)
                if mark and v is not None and v == best.get(col.key):
                    text = f"**{text}**"
                cells.append(text)
            out.append("| " + " | ".join([row.name, _family(board, row), *cells]) + " |")
        return out

    measured = [r for r in board.rows if r.kind == "measured"]
    reported = [r for r in board.rows if r.kind == "reported"]
    lines = [f"**Measured** ({len(measured)} runs from {board.n_files} results files; best per column in bold)", ""]
    lines += table(measured, True) if measured else ["(no results files found)"]
    if reported:
        lines += ["", "**Reported** (published numbers, not measured here)", ""]
        lines += table(reported, False)
        lines += ["", "Sources:"]
        lines += [f"- {r.name}: {'; '.join(r.info['sources'])}" for r in reported]
    return "\n".join(lines) + "\n"


def write_csv(board: Board, path: str | os.PathLike) -> None:
    """One line per row: model, family, kind (measured / reported), one column per leaderboard column, then the
    checkpoint (measured) or the sources (reported)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "family", "kind", *[c.label for c in board.columns], "checkpoint_or_source"])
        for row in board.rows:
            values = [row.cells.get(c.key) for c in board.columns]
            where = row.info.get("checkpoint") or "; ".join(row.info.get("sources", []))
            w.writerow([row.name, _family(board, row), row.kind, *["" if v is None else f"{v:.4f}" for v in values],
                        where or ""])


def board_json(board: Board, out_dir: Path) -> dict:
    """The data the HTML page renders (links made relative to ``out_dir`` so the folder can move as a whole)."""
    def rel(path: str) -> str:
        try:
            return os.path.relpath(path, out_dir)
        except ValueError:  # another drive
            return path

    return {
        "columns": [{"key": c.key, "label": c.label, "benchmark": c.benchmark, "pool": c.pool, "metric": c.metric,
                     "settings_hash": c.settings_hash, "settings": c.settings}
                    for c in board.columns],
        "rows": [{"name": r.name, "family": r.family, "family_label": _family(board, r), "kind": r.kind,
                  "cells": r.cells, "sources": r.info.get("sources", []), "checkpoint": r.info.get("checkpoint"),
                  "released_from": r.info.get("released_from"), "date": r.info.get("date"),
                  "hardware": r.info.get("hardware"), "browser": [rel(p) for p in r.info.get("browser", [])]}
                 for r in board.rows],
        "best": board.best(),
        "n_files": board.n_files,
        "built": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def embed_json(data) -> str:
    """JSON safe inside ``<script type="application/json">`` (no ``</script>`` can end the block early)."""
    return json.dumps(data, separators=(",", ":")).replace("</", "<\\/").replace("<!--", "<\\!--")


def page(title: str, body: str, data: dict, script: str) -> str:
    """A self-contained HTML page: inline CSS, the data as JSON, inline JS (nothing fetched: works from file://)."""
    css = (STATIC / "style.css").read_text()
    js = (STATIC / script).read_text()
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><style>{css}</style></head>\n"
            f"<body>{body}\n<script type=\"application/json\" id=\"data\">{embed_json(data)}</script>\n"
            f"<script>{js}</script></body></html>\n")


def write_html(board: Board, path: str | os.PathLike) -> None:
    path = Path(path)
    data = board_json(board, path.parent)
    body = ("<header><h1>unimm leaderboard</h1><p id=\"summary\"></p></header>"
            "<div class=\"filters\">"
            "<label>family <select id=\"f-family\"><option value=\"\">all</option></select></label>"
            "<label>benchmark <select id=\"f-benchmark\"><option value=\"\">all</option></select></label>"
            "<label>pool <select id=\"f-pool\"><option value=\"\">all</option></select></label>"
            "<label><input type=\"checkbox\" id=\"f-reported\" checked> reported rows</label></div>"
            "<table id=\"board\"><thead></thead><tbody></tbody></table>"
            "<p class=\"note\">Measured rows come from results.json files; <span class=\"reported-tag\">reported</span> "
            "rows are published numbers (source on hover), never ranked with measured ones. "
            "<span class=\"best\">Bold ★</span> = best measured value of the column. Click a header to sort.</p>")
    path.write_text(page("unimm leaderboard", body, data, "leaderboard.js"))


def write_all(board: Board, out_dir: str | os.PathLike, stem: str = "leaderboard") -> dict[str, Path]:
    """Write ``<stem>.md``, ``<stem>.csv`` and ``<stem>.html`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / f"{stem}.md", "csv": out_dir / f"{stem}.csv", "html": out_dir / f"{stem}.html"}
    paths["md"].write_text(markdown(board))
    write_csv(board, paths["csv"])
    write_html(board, paths["html"])
    return paths
