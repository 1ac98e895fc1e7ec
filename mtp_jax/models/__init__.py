"""Models: the Llama/Qwen3 decoder, gated LoRA, the sampler head and checkpoint loading."""

from mtp_jax.models.config import ModelConfig, UnsupportedModelError
from mtp_jax.models.llama import CausalLM, causal_attend
from mtp_jax.models.loading import ModelLoadError, load_model, load_tokenizer, resolve_model_dir
from mtp_jax.models.lora import LoRAConfig

__all__ = ["CausalLM", "ModelConfig", "LoRAConfig", "ModelLoadError", "UnsupportedModelError", "causal_attend",
           "load_model", "load_tokenizer", "resolve_model_dir"]
