"""Real sizes without memory: the 8B param trees, their counts and logical partition specs (eval_shape)."""

from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from mtp_jax.models import CausalLM, ModelConfig
from mtp_jax.models.loading import abstract_params, hf_name

MODELS = Path(__file__).parent.parent / "configs" / "models"


@pytest.mark.parametrize("name,expected", [("qwen3-8b.json", 8_190_735_360), ("llama-3.1-8b.json", 8_030_261_248)])
def test_8b_param_tree(name, expected):
    config = ModelConfig.from_file(MODELS / name)
    boxed = abstract_params(CausalLM(config))
    leaves = jax.tree.leaves(nn.unbox(boxed))
    assert sum(int(np.prod(x.shape)) for x in leaves) == expected
    specs = nn.get_partition_spec(boxed)
    layer = specs["model"]["layers"]  # stacked: a leading "layers" axis
    assert tuple(layer["self_attn"]["q_proj"]["kernel"]) == ("layers", "embed", "q_heads")
    assert tuple(layer["self_attn"]["k_proj"]["kernel"]) == ("layers", "embed", "kv_heads")
    assert tuple(layer["mlp"]["down_proj"]["kernel"]) == ("layers", "mlp", "embed")
    q_shape = nn.unbox(boxed)["model"]["layers"]["self_attn"]["q_proj"]["kernel"].shape
    assert q_shape == (config.num_layers, config.hidden_size, config.q_features), q_shape
    assert tuple(specs["model"]["embed_tokens"]["embedding"]) == ("vocab", "embed")
    assert tuple(specs["lm_head"]["kernel"]) == ("embed", "vocab")
    assert ("q_norm" in layer["self_attn"]) == (config.model_type == "qwen3")
    # every leaf carries logical axes, one per dim
    flat = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    for path, leaf in flat:
        assert isinstance(leaf, nn.Partitioned), f"{path} has no logical axes"
        assert len(leaf.names) == leaf.value.ndim


def test_flax_names_map_to_hf_names():
    assert hf_name(("model", "layers", "self_attn", "q_proj", "kernel"), 12) == (
        "model.layers.12.self_attn.q_proj.weight", True)
    assert hf_name(("model", "embed_tokens", "embedding")) == ("model.embed_tokens.weight", False)
    assert hf_name(("model", "layers", "input_layernorm", "weight"), 0) == (
        "model.layers.0.input_layernorm.weight", False)
    with pytest.raises(ValueError, match="layer index"):
        hf_name(("model", "layers", "input_layernorm", "weight"))
