"""The old import names of speculative decoding (`mtp_jax.decoding.speculative`, `.adapter`)."""

from mtp_jax.decoding.adapter import AdapterMismatchError, check_architecture, check_vocabulary, load_adapter
from mtp_jax.decoding.speculative import DecodeResult, speculative_generate, speculative_stream

__all__ = ["AdapterMismatchError", "DecodeResult", "check_architecture", "check_vocabulary", "load_adapter",
           "speculative_generate", "speculative_stream"]
