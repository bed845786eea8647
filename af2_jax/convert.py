"""`python -m af2_jax.convert`: the command lives in `af2_jax.cli.convert`."""

import sys

from af2_jax.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
