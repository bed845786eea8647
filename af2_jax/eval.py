"""`python -m af2_jax.eval`: the command lives in `af2_jax.cli.eval`."""

import sys

from af2_jax.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
