"""`python -m af2_jax.serve`: the command lives in `af2_jax.cli.serve`."""

import sys

from af2_jax.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
