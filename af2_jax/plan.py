"""`python -m af2_jax.plan`: the command lives in `af2_jax.cli.plan`."""

import sys

from af2_jax.cli.plan import main

if __name__ == "__main__":
    sys.exit(main())
