"""unimm: train and evaluate universal multimodal embedding models on one platform."""

__version__ = "0.1.0"
