"""Golden outputs of the official M-BEIR (UniIR) and MMEB (VLM2Vec v1) scoring on hand-made rankings.

Official code (run from checkouts, never copied into unimm):
  - UniIR, https://github.com/TIGER-AI-Lab/UniIR at 98dc570c2645fec8e1fd42c7d4ac9853f46051fd:
    ``src/common/mbeir_retriever.py``: ``compute_recall_at_k`` and the per-task mean of ``run_retrieval``
    (``round(sum / len, 4)``), on a faiss ``IndexFlatIP`` built as ``create_index`` / ``search_index`` do
    (``faiss.normalize_L2`` on pool and queries).
  - VLM2Vec v1 (MMEB), https://github.com/TIGER-AI-Lab/VLM2Vec at 61dd9cbc0603a80e1f3379379b3488ca18046a54
    (the last v1 ``eval.py`` before the v2 rewrite): ``evaluation/eval_utils.py::get_pred`` and ``eval.py``'s
    ``n_correct / len(eval_data)`` with ``pred == 0``.

Shims (cannot change a number): ``mbeir_retriever.py`` imports faiss-gpu, OmegaConf, every UniIR model and the
interactive retriever at module level, so ``compute_recall_at_k`` is compiled from the checkout's source with
``ast`` and run unchanged; the pool index is faiss-cpu ``IndexFlatIP`` instead of the same index cloned to GPUs
(``index_cpu_to_all_gpus``), an exact inner-product search either way. ``get_pred`` is imported from the
checkout as it is.

Environment: /work/golden/envs/e_official (Python 3.11, numpy 2.x, faiss-cpu 1.15.1).

Rerun (writes tests/golden/metrics/metrics.json):
  python3 -m venv /work/golden/envs/e_official
  /work/golden/envs/e_official/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers==4.36.2 \\
      timm==0.4.12 tokenizers==0.15.2 einops==0.8.2 scipy==1.17.1 safetensors==0.8.0 numpy==2.4.6 \\
      pillow==13.0.0 faiss-cpu==1.15.1 torchmetrics==1.9.0 ftfy==6.3.1 regex
  git --git-dir=<UniIR mirror> archive 98dc570c2645fec8e1fd42c7d4ac9853f46051fd | tar -x -C /tmp/uniir
  git --git-dir=<VLM2Vec mirror> archive 61dd9cbc0603a80e1f3379379b3488ca18046a54 | tar -x -C /tmp/vlm2vec_v1
  /work/golden/envs/e_official/bin/python tests/golden/scripts/metrics.py --uniir /tmp/uniir --vlm2vec-v1 /tmp/vlm2vec_v1
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "metrics"
UNIIR_COMMIT = "98dc570c2645fec8e1fd42c7d4ac9853f46051fd"
VLM2VEC_V1_COMMIT = "61dd9cbc0603a80e1f3379379b3488ca18046a54"


def official_function(path: Path, name: str):
    """Compile one top-level function of an official source file, unchanged, in a fresh namespace."""
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace: dict = {}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


# --- M-BEIR: 12 candidates (ids "9:1".."9:12"), 7 queries in 2 tasks; exact binary values so ties are exact ---
# candidate rows: 2 and 5 are identical (a tie at every query), 7 duplicates 0
CANDS = np.array([
    [1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0],
    [1, 0, 1, 0], [1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 0, 1],
], dtype=np.float32)
QUERIES = np.array([
    [1, 1, 0, 0],      # q0: top-2 are the tied pair (2, 5)
    [1, 0, 0, 0],      # q1: tie between 0 and 7 (duplicates)
    [0, 0, 1, 0],      # q2
    [0, 1, 0, 1],      # q3
    [1, 1, 1, 1],      # q4: several positives
    [0, 0, 0, 1],      # q5: positive only outside the pool
    [2, 1, 0, 0],      # q6: positive ranked late
], dtype=np.float32)
CAND_IDS = [f"9:{i + 1}" for i in range(len(CANDS))]
# qrels: query id -> (task id, relevant candidate ids); "9:99" is not in the pool
QRELS = {
    "9:q0": ("0", ["9:6"]),               # the second of the tied pair (index 5)
    "9:q1": ("0", ["9:8"]),               # the duplicate of candidate 0 (index 7)
    "9:q2": ("0", ["9:4", "9:10"]),
    "9:q3": ("3", ["9:12", "9:5"]),
    "9:q4": ("3", ["9:11", "9:3", "9:6", "9:2"]),
    "9:q5": ("3", ["9:99"]),
    "9:q6": ("3", ["9:9"]),
}
METRICS = ["Recall@1", "Recall@5", "Recall@10"]

# --- MMEB: each row = query vector + its own candidate list, positive first ---
MMEB_ROWS = [
    {"qry": [1, 0, 0, 0], "tgt": [[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]]},       # exact tie with a duplicate
    {"qry": [1, 1, 0, 0], "tgt": [[0, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0]]},       # a negative wins
    {"qry": [0.5, 0.25, 0, 1], "tgt": [[0, 0, 0, 1], [0, 0, 1, 0], [1, 0, 0, 0]]},  # positive wins
    {"qry": [1, 1, 1, 1], "tgt": [[1, 1, 1, 1], [2, 2, 2, 2], [1, 1, 1, 0]]},       # wins cosine, loses dot
    {"qry": [0, 1, 0, 0], "tgt": [[0, 0.5, 0, 0], [0, 1, 0, 0], [0, 0.5, 0, 0]]},   # ties cosine, loses dot
]


def mbeir(uniir: Path) -> dict:
    import faiss

    compute_recall_at_k = official_function(uniir / "src/common/mbeir_retriever.py", "compute_recall_at_k")
    cands, queries = CANDS.copy(), QUERIES.copy()
    faiss.normalize_L2(cands)  # create_index
    faiss.normalize_L2(queries)  # search_index
    index = faiss.IndexIDMap(faiss.IndexFlatIP(cands.shape[1]))  # add_with_ids as create_index
    index.add_with_ids(cands, np.arange(len(cands), dtype=np.int64))
    k = max(int(m.split("@")[1]) for m in METRICS)
    distances, indices = index.search(queries, k)
    qids = list(QRELS)
    per_query, by_task = {}, {}
    for i, row in enumerate(indices):
        retrieved = [CAND_IDS[j] for j in row]
        task, relevant = QRELS[qids[i]]
        per_query[qids[i]] = {m: compute_recall_at_k(relevant, retrieved, int(m.split("@")[1])) for m in METRICS}
        for m in METRICS:
            by_task.setdefault(task, {}).setdefault(m, []).append(per_query[qids[i]][m])
    task_means = {t: {m: round(sum(v) / len(v), 4) for m, v in ms.items()} for t, ms in by_task.items()}
    return {
        "cand_ids": CAND_IDS, "candidates": CANDS.tolist(), "query_ids": qids, "queries": QUERIES.tolist(),
        "qrels": {q: {"task": t, "relevant": r} for q, (t, r) in QRELS.items()}, "metrics": METRICS,
        "faiss_ranking": indices.tolist(), "faiss_scores": distances.tolist(),
        "per_query": per_query, "task_means": task_means,
    }


def mmeb(vlm2vec_v1: Path) -> dict:
    sys.path.insert(0, str(vlm2vec_v1))
    from evaluation.eval_utils import get_pred

    rows = []
    for normalization in (True, False):
        n_correct, preds, scores = 0, [], []
        for row in MMEB_ROWS:
            qry_t = np.asarray(row["qry"], dtype=np.float32)  # eval.py: encoded reps are .float().numpy()
            tgt_t = np.stack([np.asarray(t, dtype=np.float32) for t in row["tgt"]], axis=0)
            s, pred = get_pred(qry_t, tgt_t, normalization=normalization)
            n_correct += int(pred == 0)
            preds.append(int(pred))
            scores.append([float(x) for x in s])
        rows.append({"normalization": normalization, "pred": preds, "scores": scores,
                     "acc": n_correct / len(MMEB_ROWS), "num_correct": n_correct, "num_pred": len(MMEB_ROWS)})
    return {"rows": MMEB_ROWS, "runs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uniir", type=Path, required=True, help=f"UniIR checkout at {UNIIR_COMMIT}")
    parser.add_argument("--vlm2vec-v1", type=Path, required=True, help=f"VLM2Vec checkout at {VLM2VEC_V1_COMMIT}")
    args = parser.parse_args()
    import faiss

    out = {
        "official": {"uniir": UNIIR_COMMIT, "vlm2vec_v1": VLM2VEC_V1_COMMIT},
        "versions": {"numpy": np.__version__, "faiss": faiss.__version__, "python": sys.version.split()[0]},
        "mbeir": mbeir(args.uniir), "mmeb": mmeb(args.vlm2vec_v1),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "metrics.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["mbeir"]["task_means"]), json.dumps([r["acc"] for r in out["mmeb"]["runs"]]))


if __name__ == "__main__":
    main()
