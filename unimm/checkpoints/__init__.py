"""Safe checkpoint loading and rebuilding runs from the config stored inside them."""

from unimm.checkpoints.io import LoadedRun, load_checkpoint, load_run

__all__ = ["LoadedRun", "load_checkpoint", "load_run"]
