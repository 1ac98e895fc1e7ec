"""On the real SmolLM2-135M: 50 optimizer steps on a few of its own responses lower every
draft step's loss and raise its top-1 agreement with the base model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtp_jax.decoding.plain import generate
from mtp_jax.decoding.request import encode_prompt, eos_ids_of
from mtp_jax.models import LoRAConfig, load_model, load_tokenizer
from mtp_jax.mtp.mask_token import mask_embedding
from mtp_jax.mtp.model import MTPConfig, MTPModel
from mtp_jax.mtp.objective import init_params, loss_and_grads, metrics_from_sums, split_params

PROMPTS = ["Write a Python function that returns the sum of a list.",
           "What is 15 + 27? Answer briefly.",
           "Write a Python function that counts vowels in a string."]


@pytest.mark.slow
def test_fifty_steps_learn_every_draft_step(smollm2_dir):
    k = 3
    tok = load_tokenizer(smollm2_dir)
    base_model, base, config = load_model(smollm2_dir)
    prompts = [encode_prompt(tok, p, chat=True) for p in PROMPTS]
    responses = generate(base_model, base, prompts, 40, eos_ids_of(tok, config))
    length = max(len(p) + len(r) for p, r in zip(prompts, responses))
    batch = {key: np.zeros((len(prompts), length), np.int32) for key in ("tokens", "positions", "segment_ids")}
    batch["response_mask"] = np.zeros((len(prompts), length), bool)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        batch["tokens"][row, :n] = p + r
        batch["positions"][row, :n] = np.arange(n)
        batch["segment_ids"][row, :n] = 1
        batch["response_mask"][row, len(p):n] = True
    batch = {key: jnp.asarray(v) for key, v in batch.items()}

    model = MTPModel(config, LoRAConfig(rank=8, alpha=16.0), MTPConfig(draft_length=k, soft_ce_impl="jnp"))
    params = init_params(model, base, mask_embedding(base["model"]["embed_tokens"]["embedding"], config.vocab_size),
                         jax.random.key(0))
    trainable, frozen = split_params(model, params)
    opt = optax.adamw(2e-3, weight_decay=0.01)
    opt_state = opt.init(trainable)

    @jax.jit  # base params and batch as arguments: closed-over constants would be folded at compile time
    def step(trainable, opt_state, frozen, batch):
        loss, grads, sums = loss_and_grads(model, trainable, frozen, batch)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, metrics_from_sums(sums, k)

    first = None
    for _ in range(50):
        trainable, opt_state, metrics = step(trainable, opt_state, frozen, batch)
        first = first or jax.device_get(metrics)
    _, _, last = step(trainable, opt_state, frozen, batch)
    last = jax.device_get(last)
    for j in range(1, k + 1):
        assert last[f"loss/step_{j}"] < first[f"loss/step_{j}"], (j, first, last)
        assert last[f"acc/step_{j}"] > first[f"acc/step_{j}"], (j, first, last)
    assert last["accept_len"] > first["accept_len"]
