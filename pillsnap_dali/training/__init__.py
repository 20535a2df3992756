"""The classification training loop: the Trainer (engine), checkpoints, metrics and the run report."""
