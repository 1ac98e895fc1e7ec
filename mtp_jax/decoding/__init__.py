"""Decoding: plain KV-cached generation and lossless speculative decoding with the trained drafts.

`sampling` (token choice), `request` (prompts -> padded ids), `cache` (per-layer KV cache and its
attention), `layout` (the decode-time parameter layout, built once at load), `plain`,
`speculative`, `exactness` (where bf16 outputs part, near-ties), `adapter` (a training run's
adapters, loaded and laid out) and `cli` (`python -m mtp_jax.decoding`). No module here imports
`mtp_jax.train` (`checkpoints.load_run`, which `adapter.load_adapter` calls, reads a run's config
through it).
"""
