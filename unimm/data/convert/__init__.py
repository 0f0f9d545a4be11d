"""Converters from public dataset formats into unimm shards and benchmarks.

Run ``python -m unimm.data.convert --help``. Each converter counts every skipped sample by reason and writes
the counts, with examples, to ``<out>/convert_report.json``.

- ``mbeir``: M-BEIR (UniIR) JSONL queries, candidate pools and qrels (:mod:`unimm.data.convert.mbeir`).
- ``toy``: the bundled toy dataset of coloured digits (:mod:`unimm.data.toy`).
"""
