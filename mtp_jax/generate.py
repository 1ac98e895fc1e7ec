"""`python -m mtp_jax.generate ...`: the decoding CLI (`mtp_jax.decoding.cli`) under its old name,
and the old import names of plain generation (`mtp_jax.decoding.plain`)."""

import sys

from mtp_jax.decoding.cli import compile_seconds, main
from mtp_jax.decoding.plain import generate
from mtp_jax.decoding.request import check_request, encode_prompt, eos_ids_of, left_pad, pad_id_of
from mtp_jax.decoding.sampling import Sampling, filter_logits, sample_token

__all__ = ["Sampling", "check_request", "compile_seconds", "encode_prompt", "eos_ids_of", "filter_logits",
           "generate", "left_pad", "main", "pad_id_of", "sample_token"]

if __name__ == "__main__":
    sys.exit(main())
