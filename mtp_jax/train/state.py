"""What a run trains from: the mesh, the base model and tokenizer, the model, and the sharded train state.

The train state is {step (optimizer steps), trainable (adapters, sampler, optionally the <mask> row),
opt_state, rng, skipped}; its shardings come from `jax.eval_shape` and the logical-axis rules, so an 8B
state is placed, never built whole on one device. The frozen base is put in the layout the step reads
(`training_layout`) here, once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from mtp_jax import cli
from mtp_jax.config import ConfigError
from mtp_jax.models import ModelConfig, load_model, load_tokenizer, resolve_model_dir
from mtp_jax.models.llama import CausalLM
from mtp_jax.models.loading import abstract_params
from mtp_jax.mtp.attention import plan_attention
from mtp_jax.mtp.mask_token import add_mask_token, mask_embedding
from mtp_jax.mtp.model import MTPModel
from mtp_jax.mtp.objective import init_args, init_params, stored_layout, trainable_keys, training_layout
from mtp_jax.sharding import axes_across_processes, logical_shardings, make_mesh, replicated
from mtp_jax.train.config import Config
from mtp_jax.train.step import make_optimizer

log = functools.partial(cli.log, "train")


def training_mesh(cfg: Config) -> tuple[Mesh, Any]:
    """(mesh, logical rules); the batch must split over the mesh's row axes."""
    mesh = make_mesh(cfg.mesh)
    rows_axis = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.data.batch_size % rows_axis:
        raise ConfigError(f"data.batch_size ({cfg.data.batch_size}) must divide by mesh data*fsdp ({rows_axis})")
    log(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices, "
        f"{jax.process_count()} process(es)")
    slow = [a for a in axes_across_processes(mesh.devices) if a != "data"]
    if slow:
        log(f"warning: mesh axes {slow} span processes (hosts): their per-layer all-gathers and reduce-scatters "
            f"go over the inter-host network. Keep fsdp*tensor within one host's devices and let data span hosts "
            f"(e.g. --mesh.fsdp {jax.local_device_count() // mesh.shape['tensor']} --mesh.data -1)")
    return mesh, cfg.mesh.logical_rules()


def _hf_config_file(path: str) -> Path:
    """config.json named by `path`: the file itself, a directory holding one, or a model alias."""
    p = Path(path)
    if p.is_file():
        return p
    try:
        p = resolve_model_dir(path) / "config.json"
    except Exception as e:
        raise ConfigError(f"model.path: {path}: not a config.json, model directory, alias or hub repo id ({e})") \
            from None
    if not p.is_file():
        raise ConfigError(f"model.path: {p} not found (model.random_init: true needs a HF config.json)")
    return p


def model_config(cfg: Config) -> ModelConfig:
    """The base model's ModelConfig from its config.json (with random_init, plus config_overrides): no weights read."""
    m = cfg.model
    if m.random_init:
        p = _hf_config_file(m.path)
        try:
            hf = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"model.path: {p}: not valid JSON (line {e.lineno}: {e.msg})") from None
        return ModelConfig.from_hf({**hf, **m.config_overrides}, source=str(p))
    return ModelConfig.from_file(resolve_model_dir(m.path) / "config.json")


def tokenizer_with_mask(cfg: Config, config: ModelConfig):
    """(tokenizer with `<mask>` added, its text vocabulary size before that)."""
    path = cfg.model.tokenizer or cfg.model.path
    tokenizer = load_tokenizer(path)
    text_vocab = len(tokenizer)
    if text_vocab > config.vocab_size:
        raise ConfigError(f"model.tokenizer: {path} has {text_vocab} tokens but the model's embedding "
                          f"table has {config.vocab_size} rows; use the base model's own tokenizer")
    add_mask_token(tokenizer, config.vocab_size, cfg.mtp.mask_token)
    return tokenizer, text_vocab


def load_base(cfg: Config, config: ModelConfig, mesh: Mesh, rules):
    """Base params placed by the logical rules: random for model.random_init, else read from model.path."""
    m = cfg.model
    if m.random_init:
        lm = CausalLM(config, None, jnp.dtype(m.dtype), jnp.dtype(m.base_dtype))
        shardings = logical_shardings(abstract_params(lm), mesh, rules)
        tokens = jnp.zeros((1, 1), jnp.int32)
        init = jax.jit(lambda r: nn.unbox(lm.init(r, tokens, method=lm.forward_logits)["params"]),
                       out_shardings=shardings)
        return init(jax.random.key(cfg.train.seed + 1000))

    def place(path, leaf):
        names = leaf.names if isinstance(leaf, nn.Partitioned) else ()
        return NamedSharding(mesh, nn.logical_to_mesh_axes(names, rules))

    return load_model(m.path, m.dtype, m.base_dtype, sharding=place)[1]


def abstract_trainable(model: MTPModel) -> dict:
    """Boxed abstract {'lora', 'sampler'} trees of `model` in the stacked layout (logical axes kept)."""
    model = stored_layout(model)
    args = init_args(model, jnp.zeros((model.config.hidden_size,)))
    v = jax.eval_shape(lambda: model.init(jax.random.key(0), *args))
    return {"lora": v["lora"]["base"], "sampler": v["params"]["sampler"]}


def count_params(tree) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


@dataclasses.dataclass
class Setup:
    """The model, its frozen params (in the training layout) and the initial train state, with shardings."""
    model: MTPModel
    frozen: dict
    frozen_sh: Any
    state: dict
    state_sh: dict
    tx: optax.GradientTransformation
    schedule: Any


def build_model(cfg: Config, config: ModelConfig) -> MTPModel:
    """The MTP model with its attention plan resolved once, for this config on this backend. Its param
    dtype is the trainables' (`model.trainable_dtype`): the params it initialises are only those; the
    frozen base is loaded in `model.param_dtype` (`load_base`)."""
    dtype, trainable_dtype = jnp.dtype(cfg.model.dtype), jnp.dtype(cfg.model.trainables_dtype)
    plan = plan_attention(cfg.mtp, dtype, config.head_dim)
    if plan.split and plan.packed and plan.impl == "cudnn" and plan.dq_kernel == "cudnn":
        log("warning: packed rows' prefix_split backward runs on cuDNN's sequence packing, which also forms "
            "dK/dV: at Qwen3-8B shapes it asked for 59.8 GiB of temporaries at 8k tokens a row. Install "
            "jax-triton (pip install -e \".[gpu]\") for the Triton dq (mtp.dq_kernel: auto)")
    return MTPModel(config, cfg.lora, cfg.mtp, dtype, trainable_dtype, plan=plan)


def _fresh_trainable(model: MTPModel, rng, mask_row) -> dict:
    params = init_params(model, {}, mask_row, rng)
    return {key: params[key] for key in trainable_keys(model)}


def _fresh_state(model: MTPModel, tx, seed: int, rng, mask_row) -> dict:
    trainable = _fresh_trainable(model, rng, mask_row)
    return {"step": jnp.int32(0), "trainable": trainable, "opt_state": tx.init(trainable),
            "rng": jax.random.key_data(jax.random.key(seed + 1)), "skipped": jnp.int32(0)}


def build(cfg: Config, config: ModelConfig, mesh: Mesh, rules, text_vocab: int) -> Setup:
    """Loads the base, computes the <mask> row, and initialises the sharded train state (step 0)."""
    base = load_base(cfg, config, mesh, rules)
    model = build_model(cfg, config)
    repl = replicated(mesh)
    table = base["model"]["embed_tokens"]["embedding"]
    mask_row = jax.jit(lambda t: mask_embedding(t, min(text_vocab, t.shape[0])), out_shardings=repl)(table)

    # shardings: base and adapters by logical rules, the optimizer state like its params, scalars replicated
    train_sh = logical_shardings(abstract_trainable(model), mesh, rules)
    keys = trainable_keys(model)
    if "mask_embedding" in keys:
        train_sh["mask_embedding"] = repl
    frozen = {"base": base, **({} if "mask_embedding" in keys else {"mask_embedding": mask_row})}
    n_base = count_params(base)
    del base, table  # with mtp.scan_layers off only the per-layer copy stays
    frozen = training_layout(model, frozen)
    tx, schedule = make_optimizer(cfg.optim, cfg.train.max_steps)
    abstract_opt = jax.eval_shape(tx.init, jax.eval_shape(functools.partial(_fresh_trainable, model), jax.random.key(0), mask_row))
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, train_sh, transform_non_params=lambda _: repl)
    state_sh = {"step": repl, "trainable": train_sh, "opt_state": opt_sh, "rng": repl, "skipped": repl}
    init = jax.jit(lambda rng, row: _fresh_state(model, tx, cfg.train.seed, rng, row), out_shardings=state_sh)
    state = init(jax.random.key(cfg.train.seed), mask_row)
    log(f"model {cfg.model.path}: {n_base / 1e6:.1f}M frozen base params, "
        f"{count_params(state['trainable']) / 1e6:.2f}M trainable, k={cfg.mtp.draft_length}, "
        f"<mask> row = mean of {min(text_vocab, config.vocab_size)} embedding rows")
    return Setup(model, frozen, jax.tree.map(lambda x: x.sharding, frozen), state, state_sh, tx, schedule)


def abstract_state(setup: Setup) -> dict:
    """The train state's shapes, dtypes and shardings (what a checkpoint restores into)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), setup.state, setup.state_sh)
