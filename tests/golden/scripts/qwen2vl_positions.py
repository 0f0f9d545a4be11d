"""Golden rotary positions of VLM2Vec's Qwen2-VL (``get_rope_index``) for its own prompts and for Qwen2-VL's format.

Official code: https://github.com/TIGER-AI-Lab/VLM2Vec at 6e1e1d42d4cba85ae4db4d3f7a25cba2465d1e16,
``src/model/vlm_backbone/qwen2_vl/modeling_qwen2_vl.py`` (``Qwen2VLForConditionalGeneration.get_rope_index``, the
same function as in the v1 tag's ``src/vlm_backbone/qwen2_vl/``). VLM2Vec writes ``<|image_pad|>`` alone in its
prompts (``VLM_IMAGE_TOKENS``); this function counts an image only where ``<|vision_start|>`` precedes it. The
script calls it on symbolic rows (left padding, a 4 x 4 patch grid = 4 merged image tokens per image) of both
forms and records the ``[3, B, L]`` positions in tests/golden/qwen2vl/positions.json; tests/test_vlm_adapters.py
maps the symbols to the tiny tokenizer's ids and compares unimm's ``Qwen2VLBackbone.position_ids``.

No shim: the method only reads ``self.config`` (a namespace with the four ids and the merge size here).

Environment: /work/golden/envs/phi35v (transformers 4.52.3, torch 2.14.1; see tests/golden/scripts/phi35v.py).
Rerun:
  git --git-dir=<VLM2Vec mirror> archive 6e1e1d42d4cba85ae4db4d3f7a25cba2465d1e16 | tar -x -C /tmp/vlm2vec
  /work/golden/envs/phi35v/bin/python tests/golden/scripts/qwen2vl_positions.py /tmp/vlm2vec
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parents[1] / "qwen2vl" / "positions.json"
COMMIT = "6e1e1d42d4cba85ae4db4d3f7a25cba2465d1e16"
IDS = {"pad": 0, "text": 5, "vision_start": 10, "image_pad": 11, "video_pad": 12, "vision_end": 13}
IMG = ["image_pad"] * 4
ROWS = {  # name -> symbols (one image of grid t=1, h=4, w=4 per row that has one)
    "vlm2vec": ["pad"] * 2 + ["text"] + IMG + ["text", "text"],
    "native": ["text", "vision_start"] + IMG + ["vision_end", "text", "text"],
    "text_only": ["pad"] * 6 + ["text"] * 3,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", help="VLM2Vec checkout at " + COMMIT)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.checkout)))
    import transformers
    from src.model.vlm_backbone.qwen2_vl.modeling_qwen2_vl import Qwen2VLForConditionalGeneration

    config = types.SimpleNamespace(vision_config=types.SimpleNamespace(spatial_merge_size=2),
                                   image_token_id=IDS["image_pad"], video_token_id=IDS["video_pad"],
                                   vision_start_token_id=IDS["vision_start"])
    out = {"official": f"https://github.com/TIGER-AI-Lab/VLM2Vec/blob/{COMMIT}/src/model/vlm_backbone/qwen2_vl/"
                       "modeling_qwen2_vl.py", "commit": COMMIT, "transformers": transformers.__version__,
           "image_grid_thw": [1, 4, 4], "rows": {}}
    for name, symbols in ROWS.items():  # one row per call: VLM2Vec's batches hold one format
        ids = torch.tensor([[IDS[s] for s in symbols]])
        mask = (ids != IDS["pad"]).long()
        grid = torch.tensor([out["image_grid_thw"]]) if "image_pad" in symbols else None
        pos, _ = Qwen2VLForConditionalGeneration.get_rope_index(types.SimpleNamespace(config=config), ids,
                                                                image_grid_thw=grid, attention_mask=mask)
        out["rows"][name] = {"symbols": symbols, "positions": [p[0][mask[0].bool()].tolist() for p in pos]}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1))
    print(json.dumps(out["rows"]))


if __name__ == "__main__":
    main()
