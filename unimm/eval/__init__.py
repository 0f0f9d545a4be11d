"""Shared evaluation: metrics, faiss index, the retrieval evaluator and reports."""
