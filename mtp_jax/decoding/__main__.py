import sys

from mtp_jax.decoding.cli import main

sys.exit(main())
