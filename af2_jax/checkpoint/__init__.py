"""Original (PyTorch) weights <-> af2-jax: the key-mapping table, a streaming safetensors reader and loaders."""

from af2_jax.checkpoint.load import MappingReport, flat_shapes, load_htsat, load_original, map_names
from af2_jax.checkpoint.reader import CheckpointError, SafetensorsCheckpoint

__all__ = ["CheckpointError", "MappingReport", "SafetensorsCheckpoint", "flat_shapes", "load_htsat",
           "load_original", "map_names"]
