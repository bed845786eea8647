"""`python -m af2_jax.infer`: the command lives in `af2_jax.cli.infer`."""

import sys

from af2_jax.cli.infer import main

if __name__ == "__main__":
    sys.exit(main())
