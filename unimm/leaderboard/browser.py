"""The results browser: static HTML pages from an evaluation's per-query outputs.

Input (written by the evaluators into a run folder)::

    per_query/manifest.json  {"evaluations": {name: {"benchmark", "protocol": "pool" | "candidate_list",
                               "queries": <query shard set>, "pool": <pool shard set | null>, "trec", "jsonl",
                               "k", "metric", "value"}}}
    pool protocol rows:       {"qid", "dataset", "task", "query_modality", "positives": [did], "ranked": [did],
                               "scores": [float], "hit": {"1": bool, "5": bool, "10": bool}}
    candidate-list rows:      {"qid", "candidates": [id], "positive": [idx], "predicted": int, "scores": [float],
                               "correct": bool}

qid / did are the ``__key__`` of records in the shard sets. A page shows every query (text, image thumbnail,
instruction) with its top-k candidates (thumbnail or text, hits framed green), filters by task, hit / miss and
query modality, and a search box; the comparison page lists the queries one run gets right and the other wrong.

Thumbnails (96 px JPEG) are made once per record into the output folder's ``thumbs/`` and only for what a page
shows; the pool itself is read in place (one pass over its shards to pick the wanted keys), never copied. Pages are
self-contained (data inline as JSON, plain JS): they open from a file path with no server.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image

from unimm.data.records import CorruptSample, Record, decode_sample
from unimm.data.shards import iter_raw_samples, read_index
from unimm.leaderboard.render import page

MANIFEST = Path("per_query") / "manifest.json"
THUMB_PX = 96
QUERY_TEXT_CHARS, CAND_TEXT_CHARS = 500, 300


# -- inputs --------------------------------------------------------------------------------------------------
def load_manifest(run_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The evaluations of a run's ``per_query/manifest.json``. Raises naming the file when it is missing."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: evaluate with a unimm version that writes per-query outputs")
    data = json.loads(path.read_text())
    if "evaluations" not in data:
        raise ValueError(f"{path}: no 'evaluations' key (keys: {sorted(data)})")
    return data["evaluations"]


def _resolve(run_dir: Path, path: str | None) -> Path | None:
    """A manifest path: absolute, or relative to per_query/, or relative to the run folder."""
    if not path:
        return None
    p = Path(path)
    if p.is_absolute():
        return p
    for base in (run_dir / MANIFEST.parent, run_dir):
        if (base / p).exists():
            return base / p
    return run_dir / MANIFEST.parent / p


def read_rows(run_dir: Path, entry: dict[str, Any]) -> list[dict[str, Any]]:
    path = _resolve(run_dir, entry.get("jsonl"))
    if path is None or not path.is_file():
        raise FileNotFoundError(f"per-query JSONL {entry.get('jsonl')!r} of {run_dir / MANIFEST} does not exist")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def normalize(row: dict[str, Any], protocol: str, k: int) -> dict[str, Any]:
    """One query in the page's form: ``ranked`` (top-k ids), ``scores``, ``positives`` and ``hit`` per cutoff."""
    if protocol == "candidate_list":
        order = sorted(range(len(row["candidates"])), key=lambda i: -row["scores"][i])[:k]
        positives = [row["candidates"][i] for i in row["positive"]]
        return {"qid": row["qid"], "task": row.get("task"), "dataset": row.get("dataset"),
                "mod": row.get("query_modality"), "ranked": [row["candidates"][i] for i in order],
                "scores": [round(float(row["scores"][i]), 4) for i in order], "positives": positives,
                "hit": {"1": bool(row["correct"])}}
    return {"qid": row["qid"], "task": row.get("task"), "dataset": row.get("dataset"), "mod": row.get("query_modality"),
            "ranked": list(row["ranked"][:k]), "scores": [round(float(s), 4) for s in row["scores"][:k]],
            "positives": list(row.get("positives", [])), "hit": {str(c): bool(v) for c, v in row["hit"].items()}}


def pool_sets(run_dir: Path, entry: dict[str, Any], queries: Path | None) -> list[Path]:
    """The shard sets the candidate ids name: the manifest's ``pool``, or for the M-BEIR global pool (``pool:
    null``) every pool of the benchmark folder holding the queries (its ``benchmark.json``)."""
    pool = _resolve(run_dir, entry.get("pool"))
    if pool is not None:
        return [pool]
    for folder in (queries.parents if queries else []):
        if (folder / "benchmark.json").is_file():
            pools = json.loads((folder / "benchmark.json").read_text()).get("pools", {})
            return [folder / rel for _, rel in sorted(pools.items())]
    return []


def fetch_by_key(shard_set: str | os.PathLike, keys: Iterable[str]) -> dict[str, Record]:
    """The records of ``shard_set`` with these ``__key__``s, read in place (one pass; stops once all are found)."""
    wanted = set(keys)
    found: dict[str, Record] = {}
    if not wanted:
        return found
    for shard in read_index(shard_set).shards:
        for raw in iter_raw_samples(shard.path):
            if raw.get("__key__") in wanted:
                try:
                    found[raw["__key__"]] = decode_sample(raw, shard=shard.path)
                except CorruptSample:
                    continue  # shown as "(unreadable)"; the evaluation's accounting already counted it
                if len(found) == len(wanted):
                    return found
    return found


# -- thumbnails and items ------------------------------------------------------------------------------------
class Thumbnails:
    """96 px JPEG thumbnails under ``out_dir/thumbs``, named by (shard set, key), made once."""

    def __init__(self, out_dir: Path, size: int = THUMB_PX):
        self.out_dir, self.size = out_dir, size
        (out_dir / "thumbs").mkdir(parents=True, exist_ok=True)
        self.made = 0

    def get(self, shard_set: str, key: str, image: Image.Image) -> str:
        name = hashlib.sha1(f"{shard_set}\0{key}".encode()).hexdigest()[:20] + ".jpg"
        path = self.out_dir / "thumbs" / name
        if not path.exists():
            thumb = image.convert("RGB")
            thumb.thumbnail((self.size, self.size), Image.Resampling.BICUBIC)
            tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
            thumb.save(tmp, format="JPEG", quality=80)
            os.replace(tmp, path)
            self.made += 1
        return f"thumbs/{name}"


def _item(record: Record | None, side: str, shard_set: str, thumbs: Thumbnails, chars: int) -> dict[str, Any]:
    if record is None:
        return {"t": "(record not found in the shard set)", "i": None}
    item = record.sides.get(side) or next(iter(record.sides.values()))
    text = item.text if item.text is None or len(item.text) <= chars else item.text[: chars - 1] + "…"
    out = {"t": text, "i": thumbs.get(shard_set, record.key, item.image) if item.image is not None else None}
    if record.instruction:
        out["ins"] = record.instruction
    return out


def evaluation_data(run_dir: Path, name: str, entry: dict[str, Any], k: int, thumbs: Thumbnails,
                    rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """What one evaluation's page shows: its queries (with their items) and the items of their top-k."""
    protocol = entry.get("protocol", "pool")
    queries = [normalize(r, protocol, k) for r in (rows if rows is not None else read_rows(run_dir, entry))]
    qset = _resolve(run_dir, entry.get("queries"))
    psets = pool_sets(run_dir, entry, qset)
    qrecords = fetch_by_key(qset, [q["qid"] for q in queries]) if qset else {}
    cand_ids = {c for q in queries for c in q["ranked"]}
    crecords: dict[str, Record] = {}
    for pset in psets:  # the global pool: every pool of the benchmark, until each candidate is found
        crecords.update(fetch_by_key(pset, cand_ids - set(crecords)))
    for q in queries:
        q.update(_item(qrecords.get(q["qid"]), "query", str(qset), thumbs, QUERY_TEXT_CHARS))
        if not q.get("mod") and q["qid"] in qrecords:
            q["mod"] = qrecords[q["qid"]].meta.get("query_modality")
        if not q.get("task") and q["qid"] in qrecords:
            q["task"] = qrecords[q["qid"]].meta.get("task")
        wanted = set(q["ranked"])
        q["positives"] = [p for p in q["positives"] if p in wanted][:k] + [p for p in q["positives"] if p not in wanted][:3]
    items = {c: _item(crecords.get(c), "cand", crecords[c].shard if c in crecords else "", thumbs, CAND_TEXT_CHARS)
             for c in sorted(cand_ids)}
    return {"name": name, "benchmark": entry.get("benchmark"), "protocol": protocol, "k": k,
            "metric": entry.get("metric"), "value": entry.get("value"), "queries": queries, "items": items}


# -- pages ---------------------------------------------------------------------------------------------------
BODY = ("<header><h1 id=\"title\"></h1><p id=\"summary\"></p></header>"
        "<div class=\"filters\">"
        "<label>task <select id=\"f-task\"><option value=\"\">all</option></select></label>"
        "<label>query modality <select id=\"f-mod\"><option value=\"\">all</option></select></label>"
        "<label>cutoff <select id=\"f-cut\"></select></label>"
        "<label id=\"l-hit\">result <select id=\"f-hit\"><option value=\"\">all</option><option value=\"hit\">hit</option>"
        "<option value=\"miss\">miss</option></select></label>"
        "<label id=\"l-side\" hidden>show <select id=\"f-side\"><option value=\"b_not_a\">B right, A wrong</option>"
        "<option value=\"a_not_b\">A right, B wrong</option></select></label>"
        "<label>search <input type=\"text\" id=\"f-text\" placeholder=\"qid or text\"></label></div>"
        "<div class=\"pager\" id=\"pager\"></div><div id=\"queries\"></div>"
        "<p class=\"note\">Green frame = a relevant candidate, red = not; scores are the model's similarities.</p>")


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def write_run_pages(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, k: int = 10) -> list[Path]:
    """One page per evaluation of a run plus ``index.html`` listing them; returns the written paths."""
    run_dir = Path(run_dir)
    out_dir = Path(out) if out else run_dir / "browser"
    manifest = load_manifest(run_dir)
    thumbs = Thumbnails(out_dir)
    written, listing = [], []
    for name, entry in manifest.items():
        data = evaluation_data(run_dir, name, entry, k, thumbs)
        data.update(mode="run", title=f"{run_dir.name}: {name}")
        path = out_dir / f"{_slug(name)}.html"
        path.write_text(page(data["title"], BODY, data, "browser.js"))
        written.append(path)
        listing.append((name, entry, path.name, len(data["queries"])))
    rows = "".join(f"<tr><td><a href=\"{html.escape(f)}\">{html.escape(n)}</a></td><td>{html.escape(str(e.get('benchmark')))}</td>"
                   f"<td>{html.escape(str(e.get('metric')))}</td><td class=\"num\">{e.get('value')}</td><td class=\"num\">{nq}</td></tr>"
                   for n, e, f, nq in listing)
    index = out_dir / "index.html"
    index.write_text(f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(run_dir.name)}</title>"
                     f"<style>{(Path(__file__).with_name('static') / 'style.css').read_text()}</style></head><body>"
                     f"<h1>{html.escape(str(run_dir))}</h1><table><tr><th>evaluation</th><th>benchmark</th><th>metric</th>"
                     f"<th>value</th><th>queries</th></tr>{rows}</table></body></html>\n")
    return [index, *written]


def write_comparison(run_a: str | os.PathLike, run_b: str | os.PathLike, out: str | os.PathLike, k: int = 10,
                     names: tuple[str | None, str | None] = (None, None)) -> list[Path]:
    """For every evaluation both runs have: a page of the queries whose hit (at some cutoff) differs between A
    and B, with both runs' top-k side by side; the page's selector shows "B right, A wrong" or the reverse."""
    run_a, run_b, out_dir = Path(run_a), Path(run_b), Path(out)
    label_a, label_b = names[0] or run_a.name, names[1] or run_b.name
    man_a, man_b = load_manifest(run_a), load_manifest(run_b)
    common = [n for n in man_a if n in man_b]
    if not common:
        raise ValueError(f"{run_a} and {run_b} share no evaluation ({sorted(man_a)} vs {sorted(man_b)})")
    thumbs = Thumbnails(out_dir)
    written = []
    for name in common:
        rows_a = {r["qid"]: r for r in read_rows(run_a, man_a[name])}
        rows_b = {r["qid"]: r for r in read_rows(run_b, man_b[name])}
        proto = man_a[name].get("protocol", "pool")
        differ = [q for q in rows_a if q in rows_b
                  and normalize(rows_a[q], proto, k)["hit"] != normalize(rows_b[q], proto, k)["hit"]]
        # one pass per run over only the differing queries (thumbnails are shared by (shard set, key))
        data_a = evaluation_data(run_a, name, man_a[name], k, thumbs, [rows_a[q] for q in differ])
        data_b = evaluation_data(run_b, name, man_b[name], k, thumbs, [rows_b[q] for q in differ])
        by_b = {q["qid"]: q for q in data_b["queries"]}
        queries = []
        for qa in data_a["queries"]:
            qb = by_b[qa["qid"]]
            queries.append({**{x: qa[x] for x in ("qid", "task", "dataset", "mod", "t", "i") if x in qa},
                            "ins": qa.get("ins"), "a": {x: qa[x] for x in ("ranked", "scores", "positives", "hit")},
                            "b": {x: qb[x] for x in ("ranked", "scores", "positives", "hit")}})
        data = {"mode": "compare", "name": name, "title": f"{name}: {label_a} (A) vs {label_b} (B)",
                "names": [label_a, label_b], "benchmark": man_a[name].get("benchmark"), "k": k,
                "values": [man_a[name].get("value"), man_b[name].get("value")], "metric": man_a[name].get("metric"),
                "n_common": len(set(rows_a) & set(rows_b)), "queries": queries,
                "items": {**data_a["items"], **data_b["items"]}}
        path = out_dir / f"compare_{_slug(name)}.html"
        path.write_text(page(data["title"], BODY, data, "browser.js"))
        written.append(path)
    return written
