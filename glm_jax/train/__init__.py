"""Training: loss, step, optimizer, data, checkpoints."""
