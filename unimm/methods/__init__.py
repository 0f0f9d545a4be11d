"""One LightningModule per method family, on a shared base."""
