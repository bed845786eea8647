"""Which checkpoint a command uses when the user names none: the converted release in the cache, downloaded and
converted on request, else the demo model that ships inside the package."""

from __future__ import annotations

import logging
from pathlib import Path

from af2_jax.cache import cache_dir
from af2_jax.checkpoint.convert import convert
from af2_jax.checkpoint.errors import CheckpointError

log = logging.getLogger(__name__)

RELEASE_REPO = "nvidia/audio-flamingo-2"
DEMO_CHECKPOINT = Path(__file__).resolve().parent.parent / "demo_model"


def resolve_checkpoint(checkpoint=None, *, download: bool = False, dtype: str = "bfloat16") -> tuple[Path, str]:
    """(folder, why it was chosen): `checkpoint` when given; with `download`, the release converted into the cache
    (fetched and converted in `dtype` first if missing); else the cached release, else the demo model."""
    release = cache_dir() / "audio-flamingo-2"
    if checkpoint:
        return Path(checkpoint), "given"
    if download:
        if not release.exists():
            log.info("downloading %s and converting it into %s", RELEASE_REPO, release)
            convert(RELEASE_REPO, release, dtype=dtype)
        return release, "the converted release in the cache"
    if (release / "config.json").is_file():
        return release, "the converted release in the cache"
    if (DEMO_CHECKPOINT / "config.json").is_file():
        return DEMO_CHECKPOINT, "the embedded DEMO model (small, trained here on toy sounds; not AF2's release)"
    raise CheckpointError(f"no checkpoint: pass --checkpoint DIR (made by `python -m af2_jax.convert`), or "
                          f"--download to fetch and convert {RELEASE_REPO} (37 GB) into {release}")
