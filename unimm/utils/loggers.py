"""Lightning's WandbLogger without the argument that makes wandb warn on every run."""

from __future__ import annotations

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger``, less ``anonymous``: Lightning always passes it to ``wandb.init`` (``None`` when
    unset), and wandb >= 0.19 warns "The anonymous setting has no effect" for any value. Pass it only when set."""

    def __init__(self, *args, anonymous: bool | None = None, **kwargs):
        super().__init__(*args, anonymous=anonymous, **kwargs)
        if anonymous is None:
            self._wandb_init.pop("anonymous", None)
