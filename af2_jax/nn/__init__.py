"""Flax NNX modules mirroring the original PyTorch modules parameter for parameter."""
