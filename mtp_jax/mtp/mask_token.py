"""The `<mask>` token (SPEC §1): a new special token whose embedding is the mean of the real rows.

Where the table already has unused rows (Qwen3: 151936 rows for 151669 tokens) the token takes
the first free id; otherwise it is appended (vocab + 1). The table itself is never shrunk.
"""

from __future__ import annotations

import jax.numpy as jnp


class MaskTokenError(ValueError):
    """The tokenizer cannot take the `<mask>` token as asked."""


def add_mask_token(tokenizer, table_rows: int, mask_token: str = "<mask>") -> int:
    """Registers `mask_token` as an added special token; returns its id.

    Raises if the tokenizer already has the token: reusing an existing token would give the
    mask stream a row the base model was trained on.
    """
    existing = tokenizer.get_vocab().get(mask_token)
    if existing is not None:
        raise MaskTokenError(
            f"the tokenizer already has {mask_token!r} (id {existing}); MTP needs a fresh token. "
            f"Set mtp.mask_token to an unused string, e.g. '<mtp_mask>'.")
    before = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": [mask_token]}, replace_extra_special_tokens=False)
    mask_id = tokenizer.convert_tokens_to_ids(mask_token)
    if mask_id != before:
        raise MaskTokenError(f"{mask_token!r} got id {mask_id}, expected {before} (first id after the vocabulary)")
    return mask_id


def mask_embedding(embedding_table: jnp.ndarray, text_vocab: int) -> jnp.ndarray:
    """Mean of the rows of real tokens [0, text_vocab) in float32, shape [embed]."""
    return jnp.mean(embedding_table[:text_vocab].astype(jnp.float32), axis=0)


def table_rows_after(table_rows: int, mask_id: int) -> int:
    """Rows of the embedding table once `<mask>` has its row: unchanged if it fits a free row."""
    return max(table_rows, mask_id + 1)
