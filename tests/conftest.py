"""Shared fixtures: tiny random HF checkpoints (Llama, Qwen3) and the real SmolLM2-135M-Instruct."""

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Triton picks its interpreter when it is imported, for the whole process: a kernel test file's interpreted
# cases run in a child pytest with TRITON_INTERPRET=1, which its `test_interpreted_suite` starts.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRET, reason="runs in the TRITON_INTERPRET=1 child (test_interpreted_suite)")


def run_interpreted(test_file: str) -> None:
    """Run `test_file` in a child pytest under TRITON_INTERPRET=1; fail with its output if it fails."""
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", test_file, "-q", "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"interpreted {test_file} failed:\n" + proc.stdout[-6000:] + proc.stderr[-3000:]


def cpu_devices_flags(n: int) -> str:
    """XLA_FLAGS for a child process with n emulated CPU devices. On 2 cores its device threads share the
    machine with anything else running, so the tests that use it run it alone, and a collective may wait
    10 minutes (XLA's default: 40 s) before XLA aborts the process as deadlocked. XLA:CPU's
    concurrency-optimised scheduler is off: it can order the emulated devices' collectives differently,
    so that the 2x2x2 mesh's first step hangs with its devices waiting in different collectives."""
    return (f"--xla_force_host_platform_device_count={n} "
            "--xla_cpu_collective_call_terminate_timeout_seconds=600 "
            "--xla_cpu_enable_concurrency_optimized_scheduler=false")


TINY_LLAMA = dict(
    vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
    rope_theta=500000.0, bos_token_id=1, eos_token_id=2,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64},
)
TINY_QWEN3 = dict(
    vocab_size=199, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=True,
    rope_theta=1000000.0, bos_token_id=None, eos_token_id=2,
)


def make_hf_model(kind: str, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**TINY_QWEN3))
    # random norms so a missed RMSNorm weight cannot hide
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model.eval()


def save_hf(model, path, sharded: bool = False):
    model.save_pretrained(path, max_shard_size="100KB" if sharded else "10GB")
    return path


@pytest.fixture(scope="session", params=["llama", "qwen3"])
def tiny_hf(request, tmp_path_factory):
    """(kind, torch model, HF dir) for a tiny random Llama (GQA, untied, llama3 rope) and Qwen3 (q/k-norm, tied)."""
    model = make_hf_model(request.param)
    path = save_hf(model, tmp_path_factory.mktemp(f"tiny_{request.param}"))
    return request.param, model, path


@pytest.fixture(scope="session")
def smollm2_dir():
    from mtp_jax.models import resolve_model_dir

    return resolve_model_dir("smollm2-135m-instruct")
