"""`python -m af2_jax.train`: the command lives in `af2_jax.cli.train`."""

import sys

from af2_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
