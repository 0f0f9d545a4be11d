"""Strategy builders for choices Lightning expresses as strings rather than classes."""


def single_device() -> str:
    """One process on one device (Lightning's ``strategy="auto"`` with ``devices=1``)."""
    return "auto"
