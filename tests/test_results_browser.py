"""The results browser: per-query pages and the two-run comparison, checked in files and in headless Chromium.

The per-query outputs are written here by hand in the evaluators' format (per_query/manifest.json + JSONL), over a
small pool and query set written as real shard sets, so every expected top-k and every differing query is known
without running the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from unimm.data.records import Item, make_sample
from unimm.data.shards import ShardSetWriter
from unimm.leaderboard.browser import write_comparison, write_run_pages
from unimm.leaderboard.headless import find_chromium

N_IMG, N_TXT, N_Q, K = 20, 20, 12, 10
COLOURS = [(255, 0, 0), (0, 160, 0), (0, 0, 255), (200, 200, 0), (0, 200, 200)]


def image_did(i: int) -> str:
    return f"img{i:03d}"


def text_did(i: int) -> str:
    return f"txt{i:03d}"


def write_sets(root: Path) -> tuple[Path, Path]:
    """A pool of N_IMG images + N_TXT texts (two shards) and N_Q queries: even ones text (t2i), odd ones image (i2t)."""
    pool, queries = root / "pool", root / "queries"
    with ShardSetWriter(pool, max_count=15) as w:
        for i in range(N_IMG):
            image = Image.new("RGB", (64 + i, 48), COLOURS[i % len(COLOURS)])
            w.write(make_sample(image_did(i), {"did": image_did(i), "modality": "image"}, cand=Item(image=image)))
        for i in range(N_TXT):
            w.write(make_sample(text_did(i), {"did": text_did(i), "modality": "text"}, cand=Item(text=f"caption number {i}")))
    with ShardSetWriter(queries) as w:
        for q in range(N_Q):
            if q % 2 == 0:
                meta = {"qid": f"q{q:02d}", "task": "t2i", "query_modality": "text"}
                w.write(make_sample(f"q{q:02d}", meta, query=Item(text=f"query text {q}")))
            else:
                meta = {"qid": f"q{q:02d}", "task": "i2t", "query_modality": "image"}
                w.write(make_sample(f"q{q:02d}", meta, query=Item(image=Image.new("RGB", (40, 40), COLOURS[q % 5]))))
    return pool, queries


def ranked_for(q: int, shift: int) -> list[str]:
    """Top-10 of query q: images for t2i, texts for i2t, rotated by ``shift`` (the run's "model")."""
    did = image_did if q % 2 == 0 else text_did
    n = N_IMG if q % 2 == 0 else N_TXT
    return [did((q + shift + j) % n) for j in range(K)]


def positive(q: int) -> str:
    return image_did(q) if q % 2 == 0 else text_did(q)


def write_run(run_dir: Path, pool: Path, queries: Path, shift_of) -> dict[str, dict[str, bool]]:
    """Per-query outputs of one run: query q ranks ``ranked_for(q, shift_of(q))``; returns each qid's hits."""
    per_query = run_dir / "per_query"
    per_query.mkdir(parents=True)
    hits = {}
    with open(per_query / "toy_mixed.jsonl", "w") as f:
        for q in range(N_Q):
            ranked = ranked_for(q, shift_of(q))
            rank = ranked.index(positive(q)) if positive(q) in ranked else None
            hit = {c: rank is not None and rank < int(c) for c in ("1", "5", "10")}
            hits[f"q{q:02d}"] = hit
            f.write(json.dumps({"qid": f"q{q:02d}", "dataset": "toy", "task": "t2i" if q % 2 == 0 else "i2t",
                                "query_modality": "text" if q % 2 == 0 else "image", "positives": [positive(q)],
                                "ranked": ranked, "scores": [1.0 - 0.01 * j for j in range(K)], "hit": hit}) + "\n")
    manifest = {"evaluations": {"toy_mixed": {"benchmark": "toy", "protocol": "pool", "queries": str(queries),
                                              "pool": str(pool), "trec": "toy_mixed.trec", "jsonl": "toy_mixed.jsonl",
                                              "k": K, "metric": "hit@5", "value": 0.0}}}
    (per_query / "manifest.json").write_text(json.dumps(manifest))
    return hits


# Run A puts the positive first for queries 0-5 and nowhere for 6-11; run B: first for 3-8, at rank 7 for 9-11,
# nowhere for 0-2. So at @1 B wins 6, 7, 8 and A wins 0, 1, 2; at @10 B also wins 9, 10, 11.
def shift_a(q: int) -> int:
    return 0 if q < 6 else 10


def shift_b(q: int) -> int:
    return 10 if q < 3 else (0 if q < 9 else -6)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    pool, queries = write_sets(root / "data")
    hits_a = write_run(root / "run_a", pool, queries, shift_a)
    hits_b = write_run(root / "run_b", pool, queries, shift_b)
    pages = write_run_pages(root / "run_a", k=K)
    compare = write_comparison(root / "run_a", root / "run_b", root / "compare", k=K, names=("A", "B"))
    return root, hits_a, hits_b, pages, compare


def test_fixture_hits_are_the_designed_ones(runs):
    _, hits_a, hits_b, _, _ = runs
    assert [q for q, h in hits_a.items() if h["1"]] == [f"q{q:02d}" for q in range(6)]
    assert [q for q, h in hits_b.items() if h["1"]] == [f"q{q:02d}" for q in range(3, 9)]
    assert [q for q, h in hits_b.items() if h["10"]] == [f"q{q:02d}" for q in range(3, 12)]


def test_run_pages_and_thumbnails(runs):
    root, _, _, pages, _ = runs
    index, page = pages
    assert index.name == "index.html" and "toy_mixed.html" in index.read_text()
    thumbs = sorted((root / "run_a" / "browser" / "thumbs").glob("*.jpg"))
    # thumbnails only for what the page shows: 6 image queries + the images among the t2i queries' top-10
    shown_images = {d for q in range(0, N_Q, 2) for d in ranked_for(q, shift_a(q))}
    assert len(thumbs) == N_Q // 2 + len(shown_images) < N_IMG + N_Q // 2
    assert all(max(Image.open(t).size) <= 96 for t in thumbs)
    assert not list((root / "run_a" / "browser").rglob("*.tar"))  # the pool is read in place, never copied
    # a second build makes no new thumbnail
    before = {t: t.stat().st_mtime_ns for t in thumbs}
    write_run_pages(root / "run_a", k=K)
    assert {t: t.stat().st_mtime_ns for t in thumbs} == before


def test_comparison_page_holds_only_differing_queries(runs):
    root, hits_a, hits_b, _, (compare,) = runs
    data = json.loads(compare.read_text().split('<script type="application/json" id="data">')[1].split("</script>")[0])
    differing = sorted(q for q in hits_a if hits_a[q] != hits_b[q])
    assert sorted(q["qid"] for q in data["queries"]) == differing


@pytest.fixture(scope="module")
def chromium():
    from unimm.leaderboard.headless import Chromium

    with Chromium(width=1280, height=900) as browser:
        yield browser


@pytest.mark.browser
@pytest.mark.skipif(find_chromium() is None, reason="chromium not installed (apt-get install chromium)")
def test_browser_page_shows_expected_topk(runs, chromium):
    root, hits_a, _, (_, page), _ = runs
    chromium.open(page)
    assert chromium.eval("document.getElementById('count').dataset.count") == str(N_Q)
    for q in (0, 7):  # a text query (t2i) and an image query (i2t)
        qid = f"q{q:02d}"
        shown = chromium.eval(f"""(() => {{ const el = document.querySelector('.query[data-qid="{qid}"]');
            return {{ids: [...el.querySelectorAll('.cand')].map(c => c.dataset.id),
                    hits: [...el.querySelectorAll('.cand')].map(c => c.classList.contains('hit')),
                    img: !!el.querySelector('.qside img'), text: el.querySelector('.qside').textContent}}; }})()""")
        expected = ranked_for(q, shift_a(q))
        assert shown["ids"] == expected
        assert shown["hits"] == [d == positive(q) for d in expected]
        assert shown["img"] == (q % 2 == 1)
        assert (f"query text {q}" in shown["text"]) == (q % 2 == 0)
    # filters: misses at @1, then only image queries among them, then a search
    def select(sel, value):
        chromium.eval(f"(() => {{ const s = document.getElementById('{sel}'); s.value = '{value}'; "
                      "s.dispatchEvent(new Event('change')); })()")

    def shown_qids():
        return chromium.eval("[...document.querySelectorAll('.query')].map(q => q.dataset.qid)")

    select("f-hit", "miss")
    assert shown_qids() == [q for q, h in hits_a.items() if not h["1"]]
    select("f-mod", "image")
    assert shown_qids() == [q for q, h in hits_a.items() if not h["1"] and int(q[1:]) % 2 == 1]
    select("f-mod", "")
    select("f-hit", "")
    select("f-task", "t2i")
    assert shown_qids() == [f"q{q:02d}" for q in range(0, N_Q, 2)]
    select("f-task", "")
    chromium.eval("(() => { const s = document.getElementById('f-text'); s.value = 'query text 4'; "
                  "s.dispatchEvent(new Event('input')); })()")
    assert shown_qids() == ["q04"]


@pytest.mark.browser
@pytest.mark.skipif(find_chromium() is None, reason="chromium not installed (apt-get install chromium)")
def test_comparison_view_lists_exactly_the_differing_queries(runs, chromium):
    root, hits_a, hits_b, _, (compare,) = runs
    chromium.open(compare)

    def listed(side, cut):
        return chromium.eval(f"""(() => {{
            for (const [id, v] of [['f-side', '{side}'], ['f-cut', '{cut}']]) {{
                const s = document.getElementById(id); s.value = v; s.dispatchEvent(new Event('change')); }}
            return [...document.querySelectorAll('.query')].map(q => q.dataset.qid); }})()""")

    for cut in ("1", "5", "10"):
        b_not_a = [q for q in hits_a if hits_b[q][cut] and not hits_a[q][cut]]
        a_not_b = [q for q in hits_a if hits_a[q][cut] and not hits_b[q][cut]]
        assert listed("b_not_a", cut) == b_not_a, cut
        assert listed("a_not_b", cut) == a_not_b, cut
    assert listed("b_not_a", "1") == ["q06", "q07", "q08"]
    assert listed("b_not_a", "10") == ["q06", "q07", "q08", "q09", "q10", "q11"]
    assert listed("a_not_b", "1") == ["q00", "q01", "q02"]
    # each listed query shows both runs' top-k
    cols = chromium.eval("[...document.querySelector('.query[data-qid=\"q00\"]').querySelectorAll('.cmp-cols .cands')]"
                         ".map(c => [...c.querySelectorAll('.cand')].map(x => x.dataset.id))")
    assert cols == [ranked_for(0, shift_a(0)), ranked_for(0, shift_b(0))]


def test_global_pool_candidates_are_read_from_the_benchmark_pools(runs, tmp_path):
    """pool: null (M-BEIR's global pool): the candidates are found in the pools of the benchmark.json above the
    query shard set."""
    root = runs[0]
    (root / "data" / "benchmark.json").write_text(json.dumps({"name": "b", "pools": {"p": "pool"}, "evaluations": []}))
    run = tmp_path / "run_global"
    write_run(run, root / "data" / "pool", root / "data" / "queries", shift_a)
    manifest = json.loads((run / "per_query" / "manifest.json").read_text())
    manifest["evaluations"]["toy_mixed"]["pool"] = None
    (run / "per_query" / "manifest.json").write_text(json.dumps(manifest))
    _, page = write_run_pages(run, k=K)
    data = json.loads(page.read_text().split('<script type="application/json" id="data">')[1].split("</script>")[0])
    assert data["items"][text_did(3)]["t"] == "caption number 3"
    assert data["items"][image_did(0)]["i"].startswith("thumbs/")
