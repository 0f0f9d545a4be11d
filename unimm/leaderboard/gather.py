"""Gather every ``results.json`` under some output roots with DuckDB, reading the files in place.

No server and no database file: each build lists the record files and runs one query over them. A *run* (a row of
the leaderboard) is one set of weights: the checkpoint's sha256, else its weights fingerprint, else its run folder;
an evaluation of the same weights on the same benchmark, pool and evaluation settings (the record's
``eval_settings_hash``) repeated later replaces the earlier one. Evaluations with other settings are other cells:
when a column's measured values come from more than one setting, the column splits into one per setting, its label
tagged with the hash and the settings that differ (the full settings in the page's tooltip and the CSV header).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from unimm.eval.results_record import RESULTS_FILE

REPORTED_FILE = Path(__file__).with_name("reported.yaml")

# The fields the leaderboard reads (anything else in a record is ignored); a missing field reads as NULL.
COLUMNS = {
    "schema": "VARCHAR", "record_id": "VARCHAR", "model_family": "VARCHAR", "experiment": "VARCHAR",
    "checkpoint": "VARCHAR", "checkpoint_sha256": "VARCHAR", "weights_fingerprint": "VARCHAR",
    "released_from": "VARCHAR", "step": "BIGINT", "benchmark": "VARCHAR", "split": "VARCHAR", "pool": "VARCHAR",
    "suite": "VARCHAR", "headline_metric": "VARCHAR", "headline_value": "DOUBLE",
    "results": "JSON",  # parsed in Python, only for the records kept
    "unimm_version": "VARCHAR", "git_commit": "VARCHAR", "date": "VARCHAR", "config_hash": "VARCHAR",
    "eval_settings_hash": "VARCHAR", "eval_settings": "JSON",
    "wall_time_s": "DOUBLE", "hardware": "VARCHAR", "run_dir": "VARCHAR", "per_query": "VARCHAR",
}


@dataclass(frozen=True)
class Column:
    """One leaderboard column: a benchmark, its pool and the metric shown (a headline or ``evaluation/metric``),
    and the evaluation settings hash when the measured values of that benchmark / pool / metric come from more
    than one setting (``""`` otherwise, and for reported numbers). ``tag``: the settings that differ between
    those variants, readable; ``settings``: the full settings (JSON text) for the tooltip."""

    benchmark: str
    pool: str
    metric: str
    settings_hash: str = ""
    tag: str = field(default="", compare=False)
    settings: str = field(default="", compare=False)

    @property
    def key(self) -> str:
        base = f"{self.benchmark}|{self.pool}|{self.metric}"
        return f"{base}|{self.settings_hash}" if self.settings_hash else base

    @property
    def label(self) -> str:
        pool = "" if self.pool == "local" else f" ({self.pool})"
        tag = f" [{self.settings_hash}{': ' + self.tag if self.tag else ''}]" if self.settings_hash else ""
        return f"{self.benchmark}{pool}: {self.metric}{tag}"


@dataclass
class Row:
    """A leaderboard row: a measured run or a reported reference. ``cells``: column key -> value."""

    name: str
    family: str
    kind: str  # "measured" | "reported"
    cells: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Board:
    columns: list[Column]
    rows: list[Row]
    families: dict[str, str]
    n_files: int

    def best(self) -> dict[str, float]:
        """Best measured value of each column (higher is better for every metric unimm reports)."""
        best: dict[str, float] = {}
        for row in self.rows:
            if row.kind != "measured":
                continue
            for key, value in row.cells.items():
                if value is not None and (key not in best or value > best[key]):
                    best[key] = value
        return best


def find_records(roots: list[str | os.PathLike]) -> list[str]:
    """Every ``results.json`` under ``roots`` (a root may also be one results file). Raises naming the roots
    when a root does not exist."""
    files: list[str] = []
    for root in roots:
        root = Path(root)
        if root.is_file():
            files.append(str(root.resolve()))
        elif root.is_dir():
            files += sorted(str(p.resolve()) for p in root.rglob(RESULTS_FILE))
        else:
            raise FileNotFoundError(f"leaderboard root {root} does not exist")
    return sorted(set(files))


def load_reported(path: str | os.PathLike = REPORTED_FILE) -> dict[str, Any]:
    data = yaml.safe_load(Path(path).read_text()) or {}
    for i, entry in enumerate(data.get("reported", [])):
        missing = [k for k in ("model", "family", "benchmark", "pool", "metric", "value", "source") if k not in entry]
        if missing:
            raise ValueError(f"{path}: reported entry {i} ({entry.get('model', '?')}) lacks {missing}")
    return data


def query_records(files: list[str]) -> list[dict[str, Any]]:
    """The latest record per (weights, benchmark, pool, evaluation settings), as dicts (``results`` a list of dicts).

    DuckDB reads the files as text and parses them with ``json_transform`` (its ``read_json`` spends ~25 ms per
    small file on format and schema detection: 25 s for 1,000 records against ~1 s this way)."""
    import duckdb

    con = duckdb.connect()
    structure = json.dumps(COLUMNS)
    # a table function takes no prepared list parameter: the file list goes in as a quoted literal
    listed = "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"
    con.execute(f"""
        CREATE VIEW records AS
        SELECT *, coalesce(checkpoint_sha256, weights_fingerprint, run_dir, filename) AS model_key
        FROM (SELECT unnest(json_transform(content, '{structure}')), filename FROM read_text({listed}))
    """)
    cur = con.execute("""
        SELECT * FROM records
        QUALIFY row_number() OVER (PARTITION BY model_key, benchmark, pool, coalesce(eval_settings_hash, '')
                                   ORDER BY date DESC, filename) = 1
        ORDER BY model_family, experiment, model_key, benchmark, pool
    """)
    names = [d[0] for d in cur.description]
    out = []
    for values in cur.fetchall():
        rec = dict(zip(names, values))
        rec["results"] = json.loads(rec["results"]) if rec["results"] else []
        rec["eval_settings"] = json.loads(rec["eval_settings"]) if rec["eval_settings"] else None
        out.append(rec)
    return out


def settings_variants(records: list[dict[str, Any]], aliases: dict[str, str]) -> dict[tuple, Column]:
    """``(benchmark, pool, metric, settings hash) -> Column`` for the headline columns whose measured values come
    from more than one evaluation setting (a record without a hash counts as one setting, ``""``)."""
    groups: dict[tuple, dict[str, Any]] = {}
    for rec in records:
        if rec["headline_metric"] is None:
            continue
        group = (aliases.get(rec["benchmark"], rec["benchmark"]), rec["pool"] or "local", rec["headline_metric"])
        groups.setdefault(group, {})[rec["eval_settings_hash"] or ""] = rec["eval_settings"] or {}
    out: dict[tuple, Column] = {}
    for group, variants in groups.items():
        if len(variants) < 2:
            continue
        keys = sorted({k for v in variants.values() for k in v})
        differ = [k for k in keys if len({json.dumps(v.get(k), sort_keys=True, default=str) for v in variants.values()}) > 1]
        for h, settings in variants.items():
            tag = ", ".join(f"{k}={json.dumps(settings.get(k), default=str)}" for k in differ)
            out[(*group, h)] = Column(*group, settings_hash=h or "unrecorded", tag=tag[:80],
                                      settings=json.dumps(settings, sort_keys=True, default=str))
    return out


def build_board(roots: list[str | os.PathLike], reported: bool = True,
                reported_path: str | os.PathLike = REPORTED_FILE) -> Board:
    """Read every record under ``roots`` and lay out the leaderboard (measured rows, then reported rows)."""
    files = find_records(roots)
    meta = load_reported(reported_path)
    aliases = meta.get("aliases", {}) or {}
    rows: dict[str, Row] = {}
    columns: dict[str, Column] = {}
    records = query_records(files) if files else []
    split = settings_variants(records, aliases)
    if files:
        for rec in records:
            bench = aliases.get(rec["benchmark"], rec["benchmark"])
            pool = rec["pool"] or "local"
            key = rec["model_key"]
            row = rows.get(key)
            if row is None:
                short = str(key)[:8] if rec["checkpoint_sha256"] or rec["weights_fingerprint"] else Path(str(key)).name
                name = f"{rec['experiment'] or 'model'} (step {rec['step']}, {short})"
                row = rows[key] = Row(name, rec["model_family"] or "?", "measured", info={
                    "checkpoint": rec["checkpoint"], "released_from": rec["released_from"], "run_dirs": [],
                    "git_commit": rec["git_commit"], "date": rec["date"], "hardware": rec["hardware"],
                    "browser": [], "model_key": key})
            row.info["run_dirs"].append(rec["run_dir"])
            page = Path(str(rec["run_dir"])) / "browser" / "index.html"  # written by `unimm.leaderboard browse`
            if page.is_file():
                row.info["browser"].append(str(page))
            if rec["headline_metric"] is not None and rec["headline_value"] is not None:
                col = split.get((bench, pool, rec["headline_metric"], rec["eval_settings_hash"] or ""),
                                Column(bench, pool, rec["headline_metric"]))
                columns.setdefault(col.key, col)
                row.cells[col.key] = float(rec["headline_value"])
            if (bench, pool, rec["headline_metric"]) not in {k[:3] for k in split}:  # other settings: own column only
                row.info.setdefault("results", {})[(bench, pool)] = list(rec["results"]) if rec["results"] is not None else []
    reported_rows = []
    if reported:
        for entry in meta.get("reported", []):
            col = Column(str(entry["benchmark"]), str(entry["pool"]), str(entry["metric"]))
            columns.setdefault(col.key, col)
            name = f"{entry['model']} (reported)"
            row = next((r for r in reported_rows if r.name == name), None)
            if row is None:
                row = Row(name, entry["family"], "reported", info={"sources": []})
                reported_rows.append(row)
            row.cells[col.key] = float(entry["value"])
            if entry["source"] not in row.info["sources"]:
                row.info["sources"].append(entry["source"])
    # measured runs fill the reported rows' per-evaluation columns (e.g. coco_tr/hit@1) from their result rows
    for row in rows.values():
        for (bench, pool), results in row.info.pop("results", {}).items():
            for r in results:
                col = columns.get(f"{bench}|{pool}|{r['evaluation']}/{r['metric']}")
                if col is not None and r["value"] is not None:
                    row.cells.setdefault(col.key, float(r["value"]))
    # only columns some measured run or kept reported row fills, measured benchmarks first
    measured_keys = {k for r in rows.values() for k in r.cells}
    ordered = sorted(columns.values(), key=lambda c: (c.key not in measured_keys, c.benchmark, c.pool, c.metric))
    return Board(ordered, list(rows.values()) + reported_rows, meta.get("families", {}) or {}, len(files))
