"""Training: config, optimizer, loss and step, checkpoints, metrics, mesh, loop."""
