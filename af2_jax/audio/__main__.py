"""`python -m af2_jax.audio`: the command lives in `af2_jax.cli.audio`."""

import sys

from af2_jax.cli.audio import main

if __name__ == "__main__":
    sys.exit(main())
