"""Peak memory of `convert`: a sparse fake of a release (real headers, data as file holes, so it costs no disk)
converted to bfloat16.

    python bench/convert_memory.py [--size af2-0.5b] [--fixtures tests/fixtures]

The conversion runs in a child process whose peak resident set size (ru_maxrss) is reported next to the size of
the bfloat16 output, the floor for a converter that holds the output tree before writing it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.fake_release

from af2_jax.checkpoint.convert import inspect  # noqa: E402
from af2_jax.config import preset  # noqa: E402
from tests.fake_release import constant_buffers, full_state_dict, write_sparse_release  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="af2-0.5b", choices=["af2-0.5b", "af2-1.5b", "af2-3b"])
    p.add_argument("--fixtures", default=os.environ.get("AF2_FIXTURES", REPO / "tests" / "fixtures"),
                   help="folder with the af2_*_shapes.json release shape maps (default: $AF2_FIXTURES if set, else "
                        "the repository's tests/fixtures)")
    args = p.parse_args()
    shape_map = json.loads((Path(args.fixtures) / f"af2_{args.size[4:]}_shapes.json").read_text())
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        tensors = full_state_dict(shape_map)
        release = write_sparse_release(Path(tmp) / "release", tensors, chunks=1,
                                       data=constant_buffers(tensors, preset(args.size)))
        on_paper = sum(f.stat().st_size for f in (release / "safe_ckpt").glob("*.safetensors"))
        out_bytes = inspect(release, args.size, "bfloat16").out_bytes
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "af2_jax.convert", str(release), str(Path(tmp) / "out"),
                        "--dtype", "bfloat16"], check=True, cwd=REPO)
        elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print("| release | float32 on paper | bfloat16 parameters | peak RSS of convert | wall |")
    print("|---|---|---|---|---|")
    print(f"| {args.size} | {on_paper / 1e9:.2f} GB | {out_bytes / 1e9:.2f} GB | {peak / 1e9:.2f} GB | "
          f"{elapsed:.0f} s |")


if __name__ == "__main__":
    main()
