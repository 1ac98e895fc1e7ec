"""A training run's adapters for decoding: loaded, checked against the base model asked for, and
put in the decoding layout once."""

from __future__ import annotations

import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from mtp_jax.decoding.layout import SMALL_BASE_PARAMS, prepare, small_base
from mtp_jax.decoding.speculative import with_draft_vocab
from mtp_jax.models.config import ModelConfig
from mtp_jax.models.llama import CausalLM
from mtp_jax.mtp.model import MTPModel
from mtp_jax.paths import absolute


class AdapterMismatchError(ValueError):
    """Adapters trained for another base model or vocabulary than the one asked for."""


# what an adapter's shapes and meaning depend on
_ARCHITECTURE = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "tie_word_embeddings", "qk_norm")


def check_architecture(trained: ModelConfig, config: ModelConfig, what: str) -> None:
    """Raises AdapterMismatchError unless `config` has the architecture the adapters were trained on."""
    differ = [f"{f} {getattr(trained, f)} vs {getattr(config, f)}" for f in _ARCHITECTURE
              if getattr(trained, f) != getattr(config, f)]
    if differ:
        raise AdapterMismatchError(f"{what}: the adapters were trained for another model ({'; '.join(differ)})")


def check_vocabulary(trained_tokenizer, mask_token: str, tokenizer, what: str) -> None:
    """Raises AdapterMismatchError unless `tokenizer` is the run's once its `<mask>` is set aside."""
    vocab = {t: i for t, i in trained_tokenizer.get_vocab().items() if t != mask_token}
    other = tokenizer.get_vocab()
    if vocab != other:
        changed = sorted(set(vocab.items()) ^ set(other.items()), key=lambda x: x[1])[:3]
        raise AdapterMismatchError(f"{what}: the adapters were trained with another vocabulary ({len(vocab)} vs "
                                   f"{len(other)} tokens; first differences {changed})")


def _checked_base(run, model_path: str):
    """(base params, config) of `model_path` once checked against `run` (architecture and vocabulary)."""
    from mtp_jax.models import load_model, load_tokenizer
    from mtp_jax.models.loading import resolve_model_dir

    m = run.model
    what = f"--adapter {run.run_dir} (trained on {run.config.model.path}) with --model {model_path}"
    check_architecture(m.config, ModelConfig.from_file(resolve_model_dir(model_path) / "config.json"), what)
    check_vocabulary(run.tokenizer, run.config.mtp.mask_token, load_tokenizer(model_path), what)
    _, base, config = load_model(model_path, jnp.dtype(m.dtype).name, jnp.dtype(m.param_dtype).name)
    if resolve_model_dir(model_path) != resolve_model_dir(run.config.model.path):
        warnings.warn(f"{what}: same architecture and vocabulary, but a different checkpoint; drafts may be "
                      "accepted less often (output is still exactly this model's)")
    return base, config


def most_frequent(counts: np.ndarray, size: int, vocab_size: int) -> np.ndarray:
    """The `size` ids below `vocab_size` with the largest `counts`, most frequent first, ties by id."""
    if size < 1:
        raise ValueError(f"drafting vocabulary: size {size} must be >= 1")
    counts = counts[:vocab_size]  # ids past the base vocabulary (<mask>) never occur in responses
    return np.argsort(-counts, kind="stable")[:size]


def draft_vocabulary(run_dir: Path, size: int, vocab_size: int) -> np.ndarray:
    """The `size` token ids that occur most often in the training run's responses (its token_counts.npy,
    `most_frequent`): the drafting vocabulary of `speculative.with_draft_vocab`."""
    from mtp_jax.checkpoints import TOKEN_COUNTS, CheckpointError

    path = Path(run_dir) / TOKEN_COUNTS
    if not path.is_file():
        raise CheckpointError(f"{path}: missing, so the run's token counts are unknown (runs write it when "
                              "training starts); decode without a drafting vocabulary")
    return most_frequent(np.load(path), size, vocab_size)


# the drafting vocabulary a large base drafts from by default (`load_adapter`, `layout.SMALL_BASE_PARAMS`)
DRAFT_VOCAB = 32768
# `load_adapter`'s defaults in the words of the CLIs' help
DRAFT_VOCAB_DEFAULT = (f"{DRAFT_VOCAB} for bases over {SMALL_BASE_PARAMS / 1e9:g}B parameters with a larger "
                       "vocabulary whose run counted its response tokens, else 0")
MERGED_DEFAULT = f"for bases of at most {SMALL_BASE_PARAMS / 1e9:g}B parameters"


def load_adapter(run_dir, model_path: str | None = None, step: int | None = None, dtype: str | None = None,
                 draft_vocab: int | None = None, merged: bool | None = None):
    """(MTPModel, params, tokenizer with <mask>) to decode with a training run's adapters, the model and
    params in the decoding layout (`layout.prepare`, built here once).

    The base is the run's own (`model.path` of its config) unless `model_path` names another copy of
    it, which is checked against the run (architecture and vocabulary) first. `draft_vocab` N > 0:
    drafts come from the N token ids most frequent in the run's training responses only
    (`speculative.with_draft_vocab`; the output stays the base model's); 0: from the whole vocabulary;
    None: `DRAFT_VOCAB` ids for a large base (`layout.small_base`) with a larger vocabulary, where the
    run has its token counts, else 0. `merged`: the merged layout (`layout.prepare`; None: for a small base).
    """
    from mtp_jax.checkpoints import TOKEN_COUNTS, load_run

    run_dir = absolute(run_dir)
    if model_path is None:
        run = load_run(run_dir, step, dtype=dtype)
        model, params = run.model, run.params
    else:
        run = load_run(run_dir, step, load_base=False, dtype=dtype)
        m = run.model
        base, config = _checked_base(run, model_path)
        model, params = MTPModel(config, m.lora, m.mtp, m.dtype, m.param_dtype), {**run.params, "base": base}
    small = small_base(params["base"])
    if draft_vocab is None:
        large_vocab = model.config.vocab_size > DRAFT_VOCAB
        draft_vocab = DRAFT_VOCAB if not small and large_vocab and (run_dir / TOKEN_COUNTS).is_file() else 0
    model, params = prepare(model, params, small if merged is None else merged)
    if draft_vocab:
        params = with_draft_vocab(model, params, draft_vocabulary(run_dir, draft_vocab, model.config.vocab_size))
    return model, params, run.tokenizer


def load_base(run_dir, model_path: str | None = None, step: int | None = None, dtype: str | None = None):
    """(CausalLM, params, tokenizer with <mask>): the base model that `load_adapter` decodes with, alone
    (no adapter weights in its layers), in the decoding layout, in the run's dtypes (or `dtype`): plain
    decoding of the very model the run's drafts speed up, with the run's tokenizer."""
    from mtp_jax.checkpoints import load_run
    from mtp_jax.models import load_model

    run = load_run(absolute(run_dir), step, load_base=False, dtype=dtype)
    m = run.model
    if model_path is None:
        _, base, config = load_model(run.config.model.path, jnp.dtype(m.dtype).name, jnp.dtype(m.param_dtype).name)
    else:
        base, config = _checked_base(run, model_path)
    return (*prepare(CausalLM(config, None, m.dtype, m.param_dtype), base), run.tokenizer)
