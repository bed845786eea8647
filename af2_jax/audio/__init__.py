"""Audio front end: host-side loading and windowing (`io`), device-side features (`features`)."""

from af2_jax.audio.features import bicubic_resize_matrix, fold_to_image, log_mel, mel_filterbank, resize_time
from af2_jax.audio.io import AudioError, collate_windows, load_windows, num_windows, read_audio, split_windows

__all__ = [
    "AudioError", "bicubic_resize_matrix", "collate_windows", "fold_to_image", "load_windows", "log_mel",
    "mel_filterbank", "num_windows", "read_audio", "resize_time", "split_windows",
]
