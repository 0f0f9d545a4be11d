"""Encoders and heads as plain nn.Modules built by builder functions (no Lightning here)."""
