"""Training: the per-worker loop, consolidated checkpoints, and launchers with and without Ray."""
