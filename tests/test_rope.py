"""RoPE inverse frequencies (default, llama3, yarn) computed in numpy, equal to transformers' own rope
init functions bit for bit; and the JAX model path never imports torch."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mtp_jax.models import ModelConfig

ROPES = {
    "default": None,
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    "yarn_all_options": {"rope_type": "yarn", "factor": 2.5, "original_max_position_embeddings": 4096,
                         "beta_fast": 16, "beta_slow": 2, "truncate": False, "mscale": 0.7, "mscale_all_dim": 1.0},
}
# head_dim x rope_theta: the tiny test models', SmolLM2's, Llama-3's and Qwen3's, and odd ones
SHAPES = [(16, 500000.0), (32, 1000000.0), (64, 10000.0), (64, 100000.0), (96, 150000.0), (128, 500000.0),
          (128, 1000000.0), (256, 12345.678)]
CASES = {f"{rope}-{dim}-{theta:g}": dict(
    model_type="llama", vocab_size=32, hidden_size=4 * dim, intermediate_size=64, num_hidden_layers=1,
    num_attention_heads=4, num_key_value_heads=4, head_dim=dim, rope_theta=theta, max_position_embeddings=131072,
    **({"rope_scaling": ROPES[rope]} if ROPES[rope] else {})) for rope in ROPES for dim, theta in SHAPES}

# transformers' own functions: LlamaRotaryEmbedding's default init, ROPE_INIT_FUNCTIONS for the others
TRANSFORMERS_ROPE = """
import json, sys
import numpy as np
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

out = {}
for name, hf in json.loads(open(sys.argv[1]).read()).items():
    config = LlamaConfig(**hf)
    kind = config.rope_parameters["rope_type"]
    init = LlamaRotaryEmbedding.compute_default_rope_parameters if kind == "default" else ROPE_INIT_FUNCTIONS[kind]
    inv, attention_factor = init(config, device="cpu")
    out[name] = inv.numpy()
    out[name + "/attention_factor"] = np.float64(attention_factor)
np.savez(sys.argv[2], **out)
"""


def transformers_rope(tmp_path, **env) -> dict[str, np.ndarray]:
    cases, path = tmp_path / "cases.json", tmp_path / "rope.npz"
    cases.write_text(json.dumps(CASES))
    subprocess.run([sys.executable, "-c", TRANSFORMERS_ROPE, str(cases), str(path)], check=True,
                   env={**os.environ, **env})
    return dict(np.load(path))


def test_inv_freq_equals_transformers_bitwise(tmp_path):
    """torch's scalar CPU kernels (ATEN_CPU_CAPABILITY=default) run C's powf, the correctly rounded float32
    power: every type, head_dim and theta gives transformers' frequencies to the bit."""
    ref = transformers_rope(tmp_path, ATEN_CPU_CAPABILITY="default")
    for name, hf in CASES.items():
        config = ModelConfig.from_hf(hf)
        ours = config.rope_inv_freq()
        assert ours.dtype == np.float32, name
        bad = np.nonzero(ours != ref[name])[0]
        assert bad.size == 0, f"{name}: entries {bad.tolist()} differ from transformers: {ours[bad]} vs {ref[name][bad]}"
        assert config.rope_attention_scaling == ref[name + "/attention_factor"], name


def test_inv_freq_within_2_ulp_of_vectorized_transformers(tmp_path):
    """torch's SIMD pow (SLEEF, on AVX2/AVX-512/NEON CPUs) may differ from powf in the last bit on some
    entries; the frequencies stay within 2 ulp of that too (llama3's smoothing can carry one ulp into two)."""
    ref = transformers_rope(tmp_path)
    for name, hf in CASES.items():
        np.testing.assert_array_max_ulp(ModelConfig.from_hf(hf).rope_inv_freq(), ref[name], maxulp=2)


NO_TORCH = """
import sys
import jax, jax.numpy as jnp
from mtp_jax.models import ModelConfig
from mtp_jax.models.llama import CausalLM

config = ModelConfig.from_hf({hf!r})
model = CausalLM(config, None, jnp.float32, jnp.float32)
ids = jnp.zeros((1, 8), jnp.int32)
variables = jax.eval_shape(lambda key: model.init(key, ids, method=model.forward_logits), jax.random.key(0))
jax.eval_shape(lambda v: model.apply(v, ids, method=model.forward_logits), variables)
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
assert not heavy, f"the JAX path imported {{heavy}}"
"""


@pytest.mark.parametrize("rope", ["default", "llama3", "yarn"])
def test_jax_forward_does_not_import_torch(rope):
    """Importing mtp_jax.models and tracing a tiny model's forward (RoPE frequencies included) imports
    neither torch nor transformers."""
    hf = CASES[f"{rope}-16-500000"]
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(NO_TORCH.format(hf=hf))], capture_output=True,
                          text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
