"""E5-V on the tiny twin of LLaVA-Phi-3.5-Mini (e5v_tiny = e5v_llava_phi35 on a random tiny LLaVA): NLI CSV (the
official sent0,sent1,hard_neg layout) -> shards; one-word summary prompts in the Phi-3 chat turn; zero-shot
embeddings are the backbone's last token of the prompt; the hard-negative loss by hand; training on text-only NLI
through the CLI lowers the loss; the real experiments keep the twin's prompts."""

from __future__ import annotations

import csv
import functools
import math

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from tests.conftest import REPO, run_cli, single_run_dir
from unimm.data.convert.nli import convert_nli
from unimm.data.records import Item, Record
from unimm.data.shards import iter_raw_samples, read_index
from unimm.data.vlm_collate import VLMCollator
from unimm.losses import InfoNCE
from unimm.methods.vlm_embed import VLMEmbedModule
from unimm.models.vlm.llava import llava_tiny_processor, tiny_llava
from unimm.models.vlm.pooling import last_token_pool

COLOURS = ["red", "green", "blue", "yellow", "magenta", "cyan"]
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def e5v_templates(experiment: str = "e5v_tiny") -> dict[str, str]:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return dict(compose("train", overrides=[f"+experiment={experiment}"]).e5v_templates)


@pytest.mark.parametrize("experiment", ["e5v_llava_phi35", "e5v_llava_phi35_stage1", "e5v_llava_phi35_stage2"])
def test_real_recipes_prompt_as_the_twin(experiment):
    assert e5v_templates(experiment) == e5v_templates()


def write_nli_csv(path, n: int = 96, seed: int = 0) -> None:
    """Triplets over the toy vocabulary: the entailment keeps colour and digit, the contradiction changes both."""
    rng = np.random.default_rng(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sent0", "sent1", "hard_neg"])
        for _ in range(n):
            c, d = rng.integers(len(COLOURS)), rng.integers(len(DIGITS))
            c2, d2 = (c + 1 + rng.integers(len(COLOURS) - 1)) % len(COLOURS), (d + 1) % len(DIGITS)
            w.writerow([f"a large {COLOURS[c]} digit {DIGITS[d]}", f"a small {COLOURS[c]} digit {DIGITS[d]}",
                        f"a large {COLOURS[c2]} digit {DIGITS[d2]}"])
        w.writerow(["an empty positive", "", "a neg"])  # skipped, counted


def test_nli_csv_to_shards(tmp_path):
    write_nli_csv(tmp_path / "nli.csv", n=5)
    report = convert_nli(tmp_path / "nli.csv", tmp_path / "nli")
    assert report["kept"] == 5 and report["skipped"] == {"empty_field": 1}
    samples = [s for sh in read_index(tmp_path / "nli").shards for s in iter_raw_samples(sh.path)]
    first = next(csv.DictReader(open(tmp_path / "nli.csv")))
    row = next(s for s in samples if s["query.txt"].decode() == first["sent0"])
    assert row["pos.txt"].decode() == first["sent1"] and row["neg.0.txt"].decode() == first["hard_neg"]
    assert not any(k.endswith((".jpg", ".png")) for s in samples for k in s)


@pytest.fixture(scope="module")
def tiny(toy_data_dir):
    vocab = str(toy_data_dir / "toy" / "vocab.txt")
    return llava_tiny_processor(vocab), tiny_llava(vocab).eval()


def test_prompts_and_zero_shot_embeddings(tiny):
    processor, backbone = tiny
    collator = VLMCollator(processor, sides=("query",), templates=e5v_templates(), use_instruction=False)
    image = Image.new("RGB", (56, 56), (255, 0, 0))
    records = [Record("a", {"query": Item(text="a red digit")}), Record("b", {"query": Item(image=image)})]
    # xtuner/llava-phi-3-mini-hf's chat turn around E5-V's prompts
    text_prompt = "<|user|>\na red digit\nSummary above sentence in one word: <|end|>\n<|assistant|>\n"
    image_prompt = "<|user|>\n<image>\nSummary above image in one word: <|end|>\n<|assistant|>\n"
    assert collator.prompt(records[0].sides["query"]) == text_prompt
    assert collator.prompt(records[1].sides["query"]) == image_prompt
    module = VLMEmbedModule(backbone, InfoNCE(0.05), optimizer=functools.partial(torch.optim.AdamW))
    with torch.no_grad():
        got = module.encode_query(collator(records)["query"])
        # reference: the backbone on the prompt strings typed out here, one row at a time
        typed = [(text_prompt, []), (image_prompt, [image])]
        want = []
        for text, images in typed:
            inputs = processor([text], [images])
            want.append(last_token_pool(backbone(inputs), inputs["attention_mask"]))
    torch.testing.assert_close(got, torch.cat(want), atol=1e-5, rtol=1e-5)


def test_hard_negative_loss_by_hand(tiny):
    processor, backbone = tiny
    collator = VLMCollator(processor, sides=("query", "pos", "neg.0"), templates=e5v_templates(),
                           use_instruction=False)
    texts = [("a red digit one", "a red digit one small", "a blue digit two"),
             ("a green digit six", "a green digit six large", "a red digit nine")]
    records = [Record(str(i), {"query": Item(text=q), "pos": Item(text=p), "neg.0": Item(text=n)})
               for i, (q, p, n) in enumerate(texts)]
    module = VLMEmbedModule(backbone, InfoNCE(0.05), optimizer=functools.partial(torch.optim.AdamW))
    batch = collator(records)
    with torch.no_grad():
        loss, _ = module.compute_loss(batch)
        q, p, n = (module.embed(batch[s]) for s in ("query", "pos", "neg.0"))
    # E5-V: CE over [q . all positives, q . own hard negative] / 0.05, written out
    expected = 0.0
    for i in range(2):
        logits = [float(q[i] @ p[j]) / 0.05 for j in range(2)] + [float(q[i] @ n[i]) / 0.05]
        expected += -(logits[i] - math.log(sum(math.exp(v) for v in logits))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_e5v_tiny_trains_on_text_only_nli(toy_data_dir, tmp_path):
    write_nli_csv(tmp_path / "nli.csv", n=192)
    convert_nli(tmp_path / "nli.csv", toy_data_dir / "nli")
    log_dir = tmp_path / "logs"
    run_cli("unimm.train", "+experiment=e5v_tiny", f"paths.data_dir={toy_data_dir}", f"paths.log_dir={log_dir}",
            f"data.train_sets.nli.path={toy_data_dir / 'nli'}",  # this CSV, not the toy NLI set e5v_tiny builds
            "logger=csv", "trainer.log_every_n_steps=2", "trainer.max_epochs=3", "eval=none", cwd=tmp_path)
    run_dir = single_run_dir(log_dir, "e5v_tiny")
    rows = list(csv.DictReader(open(next(run_dir.glob("csv/version_*/metrics.csv")))))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    # chance with 32 positives + 1 hard negative per query is ln(33) = 3.5 (measured: about 2.9 -> 0.3)
    assert np.mean(losses[-2:]) < 0.7 * np.mean(losses[:2]), losses
    assert np.mean(losses[-2:]) < 0.3 * math.log(33), losses
