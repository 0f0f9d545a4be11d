"""Training utilities: parameter groups, schedules, callbacks, strategies."""
