"""M-BEIR query instructions: the ``query_instructions.tsv`` table and the choice of one prompt per query.

File format (UniIR ``data/mbeir_dataset.py`` ``_load_query_instructions``): a header row, then one row per
(dataset, query modality, candidate modality) with ``col0 = query_modality``, ``col1 = cand_modality``,
``col3 = dataset_id`` and ``col4..`` the prompts (empty cells ignored). Column 2 (the task) is not used.

Choice: UniIR draws a prompt at random for every access, at evaluation too (seeded 2023 + rank, so its
evaluation prompts depend on the number of processes). unimm draws at random for training and, for evaluation,
deterministically from the query id (a stable hash of the qid seeds the draw), so results do not depend on the
number of processes or on batch order.
"""

from __future__ import annotations

import hashlib
import os
import random

Key = tuple[str, str, str]  # (dataset_id, query_modality, cand_modality)


def qid_seed(qid: str) -> int:
    """A stable 64-bit seed of a query id (Python's ``hash`` of a str changes between processes)."""
    return int.from_bytes(hashlib.blake2b(qid.encode("utf-8"), digest_size=8).digest(), "big")


class InstructionTable:
    """Prompts per ``(dataset_id, query_modality, cand_modality)``; ids are kept as strings (``"9"``)."""

    def __init__(self, prompts: dict[Key, list[str]]):
        self.prompts = {key: list(values) for key, values in prompts.items()}

    @classmethod
    def from_tsv(cls, path: str | os.PathLike) -> InstructionTable:
        """Read an M-BEIR instruction TSV. Raises ValueError naming the line for a row with fewer than 5 columns
        or without any prompt, and for a repeated key."""
        prompts: dict[Key, list[str]] = {}
        with open(path, encoding="utf-8") as f:
            next(f, None)  # header
            for lineno, line in enumerate(f, 2):
                if not line.strip():
                    continue
                parts = line.rstrip("\n").split("\t")
                texts = [p.strip() for p in parts[4:] if p.strip()]
                if len(parts) < 5 or not texts:
                    raise ValueError(f"{path}:{lineno}: expected query_modality, cand_modality, task, dataset_id and "
                                     f"at least one prompt, got {parts!r}")
                key = (parts[3].strip(), parts[0].strip(), parts[1].strip())
                if key in prompts:
                    raise ValueError(f"{path}:{lineno}: (dataset {key[0]}, {key[1]} -> {key[2]}) appears twice")
                prompts[key] = texts
        return cls(prompts)

    def lookup(self, dataset_id: str | int, query_modality: str, cand_modality: str) -> list[str]:
        key = (str(dataset_id), query_modality, cand_modality)
        if key not in self.prompts:
            raise KeyError(f"no instruction for dataset {key[0]}, {query_modality} -> {cand_modality}; "
                           f"the table has {sorted(self.prompts)}")
        return self.prompts[key]

    def choose(self, dataset_id: str | int, query_modality: str, cand_modality: str, qid: str | None = None,
               rng: random.Random | None = None) -> str:
        """One prompt: deterministic per ``qid`` when given (evaluation), else drawn from ``rng`` (default: the
        ``random`` module, which Lightning seeds per DataLoader worker)."""
        prompts = self.lookup(dataset_id, query_modality, cand_modality)
        if qid is not None:
            return prompts[random.Random(qid_seed(qid)).randrange(len(prompts))]
        return (rng or random).choice(prompts)


def load_instruction_table(path: str | os.PathLike | None) -> InstructionTable | None:
    """The table at ``path``, or None for no path (records then keep their own ``instruction.txt``)."""
    return InstructionTable.from_tsv(path) if path else None

