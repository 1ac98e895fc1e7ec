"""`python -m mtp_jax.generate ...`: the decoding CLI (`mtp_jax.decoding.cli`) under the name the README uses."""

import sys

from mtp_jax.decoding.cli import main

if __name__ == "__main__":
    sys.exit(main())
