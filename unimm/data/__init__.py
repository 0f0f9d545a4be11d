"""Records, shard sets, streaming, collators, converters and the bundled toy dataset."""
