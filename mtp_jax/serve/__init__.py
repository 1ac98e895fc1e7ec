"""An OpenAI-compatible HTTP server (`python -m mtp_jax.serve --adapter RUN_DIR`) that decodes
speculatively with a training run's drafts (or, as the baseline, `--decoding plain`: its base model
alone): `protocol` (the OpenAI wire format), `batcher` (the engine thread that decodes concurrent
requests as one batch) and `app` (the FastAPI routes). Nothing else in mtp_jax imports this package.
"""
