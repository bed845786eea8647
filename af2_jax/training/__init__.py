"""Fine-tuning: data pipeline, labels, train step, checkpoints, metrics and the training loop."""
