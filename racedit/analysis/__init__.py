"""Analyses of trained checkpoints (``racedit-analyze``): per-layer output norms over noise levels."""
