"""Embedding modules whose rankings are known by construction, the word-level datamodule and a text-to-text benchmark
writer, for evaluator tests."""

import functools
from pathlib import Path

import torch

from unimm.data.benchmark import BenchmarkWriter
from unimm.data.collate import RetrievalCollator
from unimm.data.datamodule import ShardDataModule
from unimm.data.records import Item, make_sample
from unimm.models.processors import word_level_processor


def write_text_benchmark(root: Path, vocab: list[str], pool: list[tuple[str, str, str]],
                         queries: list[tuple[str, str, str | None]], qrels: list[str],
                         shard_kwargs: dict | None = None, **evaluation) -> Path:
    """A one-evaluation text-to-text benchmark: ``root/vocab.txt`` (``vocab``, one word a line) and ``root/eval``
    (benchmark ``toy``) with the text pool ``pool`` and the evaluation ``t2t`` over it.

    Args:
        pool: ``(sample key, did, text)`` per candidate.
        queries: ``(sample key, qid, text)`` per query; text None writes a query with only ``meta.json``.
        qrels: TREC qrels lines (``qid 0 did relevance 0``).
        shard_kwargs: for both shard writers (e.g. ``max_count``).
        evaluation: further ``add_evaluation`` fields (e.g. ``ks``, ``report_k``).
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.txt").write_text("\n".join(vocab))
    writer = BenchmarkWriter(root / "eval", name="toy")
    with writer.pool_writer("pool", **(shard_kwargs or {})) as w:
        for key, did, text in pool:
            w.write(make_sample(key, {"did": did, "modality": "text"}, cand=Item(text=text)))
    with writer.query_writer("t2t", **(shard_kwargs or {})) as w:
        for key, qid, text in queries:
            w.write(make_sample(key, {"qid": qid}, query=Item(text=text)))
    writer.write_qrels("t2t", qrels)
    writer.add_evaluation("t2t", dataset="toy", task="t2t", query_modality="text", cand_modality="text", pool="pool",
                          **evaluation)
    writer.save()
    return root


def word_datamodule(vocab: str | Path, batch_size: int, collator=RetrievalCollator, strict: bool = False,
                    **processor_kwargs) -> ShardDataModule:
    """An evaluation-only datamodule: ``collator`` without instructions over the word-level processor of ``vocab``
    (``processor_kwargs``: e.g. ``max_length``, ``image_size``), ``batch_size`` rows per eval batch, no workers."""
    dm = ShardDataModule({}, functools.partial(collator, use_instruction=False), num_workers=0,
                         eval_batch_size=batch_size, strict=strict)
    dm.attach_processor(word_level_processor(str(vocab), **processor_kwargs))
    return dm


class FixedEncoder(torch.nn.Module):
    """Base of the hand-made encoders: no learned weights, only a device (one dummy parameter) as evaluators expect;
    subclasses define ``encode_query``, which also encodes candidates."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    @property
    def device(self):
        return self.anchor.device

    def encode_candidate(self, side):
        return self.encode_query(side)


class OneHotWordModule(FixedEncoder):
    """Embeds a text row as the one-hot vector of one of its words (``first`` or ``last``; word-level tokenizer
    rows are ``[BOS] words [EOS]``, right padded)."""

    def __init__(self, dim: int, word: str = "first"):
        super().__init__()
        if word not in ("first", "last"):
            raise ValueError(f"word={word!r}; valid: first, last")
        self.dim = dim
        self.word = word

    def encode_query(self, side):
        if self.word == "first":
            ids = side["input_ids"][:, 1]
        else:
            last = side["attention_mask"].sum(1) - 2
            ids = side["input_ids"][torch.arange(len(last)), last]
        return torch.nn.functional.one_hot(ids, self.dim).float()
