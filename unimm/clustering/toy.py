"""The cluster labels of the toy images, built in the ``prepare`` step of ``unicom_tiny`` / ``mlcd_tiny``.

The same three steps as ``python -m unimm.clustering extract | cluster | assign`` (experiments/mlcd/README.md):
features of an untrained teacher (the tiny CLIP of the UniIR toy experiment, built under a fixed seed, image and
caption fused), spherical k-means, top-l nearest centres. Cached in ``<out>/clusters.params.json`` by everything
that determines the labels: the toy set's parameters, the teacher (experiment and weights fingerprint), k,
top-l, k-means seed and iterations. A labels folder the user points at elsewhere is never touched.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from unimm.data.toy import ensure_toy

PARAMS_FILE = "clusters.params.json"


def _teacher(experiment: str, data_dir: Path, seed: int):
    """The (untrained) model and processor of ``experiment``, weights drawn under ``seed``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from unimm.runtime import CONF_DIR

    overrides = [f"+experiment={experiment}", f"paths.root_dir={data_dir.parent}", f"paths.data_dir={data_dir}",
                 f"paths.output_dir={data_dir.parent}"]
    if GlobalHydra.instance().is_initialized():  # inside `python -m unimm.train` (or a test's compose context)
        cfg = compose("train", overrides=overrides)
    else:
        with initialize_config_dir(config_dir=os.path.abspath(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=overrides)
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
        torch.manual_seed(seed)
        module = instantiate(cfg.model).eval()
    return module, instantiate(cfg.processor)


def _fingerprint(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def ensure_toy_clusters(root: str | os.PathLike, labels_dir: str | os.PathLike, seed: int = 0, k: int = 256,
                        top_l: int = 8, teacher: str = "uniir_clip_sf_tiny", niter: int = 20) -> Path:
    """Build the toy set at ``root`` and, when ``labels_dir`` is ``<root>/train/clusters/labels``, its cluster
    labels there (unless cached with the same parameters). Returns ``root``.

    Args:
        labels_dir: the labels folder the collator reads (``data.collator.labels_dir``); any other folder is the
            user's own and left as it is.
        k, top_l: k-means centres and nearest centres kept per image (MLCD top-8; UNICOM reads the first).
    """
    from unimm.clustering.kmeans import TeacherCollator, assign, extract_features, train_kmeans

    root = ensure_toy(root, seed=seed)
    out = root / "train" / "clusters"
    if Path(labels_dir).resolve() != (out / "labels").resolve():
        return root
    toy_params = json.loads((root / "toy.json").read_text())["params"]
    module, processor = _teacher(teacher, root.parent, seed)
    wanted = {"toy": toy_params, "teacher": teacher, "teacher_weights": _fingerprint(module), "k": k, "top_l": top_l,
              "seed": seed, "niter": niter, "image_sides": ["pos", "query"], "text_sides": ["query", "pos"]}
    with open(root.with_name(f".{root.name}.clusters.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the ranks of one run cluster once
        params_path = out / PARAMS_FILE
        if params_path.is_file() and json.loads(params_path.read_text()) == wanted and (out / "labels").is_dir():
            return root
        print(f"[clusters] toy cluster labels (k={k}, top-{top_l}, teacher {teacher} untrained) -> {out / 'labels'}")
        shutil.rmtree(out, ignore_errors=True)
        collate = TeacherCollator(processor, wanted["image_sides"], wanted["text_sides"])
        with torch.no_grad():
            extract_features(str(root / "train"), module.encode_candidate, collate, out / "features",
                             batch_size=256, num_workers=0, device="cpu")
        centroids = train_kmeans(out / "features", k, out / "centroids.npy", niter=niter, seed=seed)
        assign(out / "features", centroids, out / "labels", num=top_l)
        params_path.write_text(json.dumps(wanted, indent=1) + "\n")  # written last: a crash leaves no stale cache
    return root
