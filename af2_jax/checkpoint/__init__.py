"""Checkpoints: the original PyTorch weights (`safetensors_io`, `keymap`, `original`), af2-jax's own folders
(`folder`, `orbax_tree`, `native`) and conversion between the two (`convert`)."""

from af2_jax.checkpoint.errors import CheckpointError
from af2_jax.checkpoint.original import MappingReport, flat_shapes, load_htsat, load_original, map_names
from af2_jax.checkpoint.safetensors_io import SafetensorsCheckpoint

__all__ = ["CheckpointError", "MappingReport", "SafetensorsCheckpoint", "flat_shapes", "load_htsat",
           "load_original", "map_names"]
