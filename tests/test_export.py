"""Export: the HF directory loads in transformers with no warnings and equals the JAX base model; the
PyTorch reference's drafts equal the JAX mask stream + sampler head; load_model round trip; sharded
bf16 export; bad input refused with nothing written or destroyed.

Runs are trained here (2 steps, lr 0.05, so LoRA B is far from 0) on tiny random HF models: Llama
(untied, every target unfused, `<mask>` appended as row 211) and Qwen3 (tied, fused q|v and gate|up
adapters with rslora and LoRA bias, `<mask>` in the free row 190 of 199).
"""

import functools
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import yaml

from conftest import make_hf_model, save_hf
from mtp_jax import torch_reference
from mtp_jax.checkpoints import CheckpointError, load_run
from mtp_jax.config import load_config
from mtp_jax.export import ADAPTER_FILE, MTP_CONFIG_FILE, ExportError, export, main
from mtp_jax.models import load_model
from mtp_jax.models.loading import ModelLoadError
from mtp_jax.mtp.model import MTPModel
from mtp_jax.mtp.objective import variables
from mtp_jax.train import Config
from mtp_jax.train.loop import run
from test_train import COMPILE_CACHE, write_data

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4  # fp32, |JAX - transformers| for logits up to LOGIT_SCALE in size
LOGIT_SCALE = 50.0  # float32 rounding grows with the logits: larger ones get TOL * max|logit| / LOGIT_SCALE


def tolerance(*logits) -> float:
    return TOL * max(1.0, max(float(np.abs(x).max()) for x in logits) / LOGIT_SCALE)


RUN_OVERRIDES = {
    "llama": [],
    "qwen3": ["--lora.fuse", "true", "--lora.rslora", "true", "--lora.bias", "true",
              "--lora.targets", "[q, v, o, gate, up, down]"],
}
TOKENIZER_SIZE = {"llama": 211, "qwen3": 190}  # Llama table 211 rows: <mask> appended; Qwen3 199: free row


def tiny_tokenizer(size: int, texts):
    """A word-level fast tokenizer of exactly `size` tokens covering the words of `texts`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.WhitespaceSplit()
    words = sorted({w for t in texts for w, _ in split.pre_tokenize_str(t)})
    vocab = ["<unk>", "<s>", "</s>"] + words
    vocab += [f"w{i}" for i in range(size - len(vocab))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = split
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def train_run(tmp: Path, base: str, data: Path, *overrides: str) -> Path:
    cfg = load_config(Config, ROOT / "configs" / "tiny_test.yaml", [
        "--model.path", base, "--model.random_init", "false", "--model.tokenizer", base,
        "--model.config_overrides", "{}", "--data.train_file", str(data), "--data.cache_dir", str(tmp / "cache"),
        "--train.save_dir", str(tmp / "run"), "--train.max_steps", "2", "--optim.warmup_steps", "0",
        "--optim.lr", "0.05", *overrides])
    return run(cfg)["run_dir"]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def exported(request, tmp_path_factory):
    """A trained tiny run of each kind and its fp32 export."""
    jax.config.update("jax_compilation_cache_dir", COMPILE_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    kind = request.param
    tmp = tmp_path_factory.mktemp(f"export_{kind}")
    data = write_data(tmp / "train.jsonl")
    base = save_hf(make_hf_model(kind), tmp / "base")
    texts = [v for line in open(data) for v in json.loads(line).values()]
    tiny_tokenizer(TOKENIZER_SIZE[kind], texts).save_pretrained(base)
    run_dir = train_run(tmp, str(base), data, *RUN_OVERRIDES[kind])
    out = export(run_dir, tmp / "out", dtype="float32")
    return SimpleNamespace(kind=kind, base=base, run_dir=run_dir, out=out, texts=texts, run=load_run(run_dir))


def jax_drafts(model: MTPModel, mask_id: int, params, tokens, anchors):
    """(base logits [L, V], draft logits [anchors, k, V], drafts [anchors, k]) from the JAX model:
    regular stream, mask stream, sampler head; prev_1 = base argmax at a, prev_j = draft j-1."""
    v = variables(params)
    positions = jnp.arange(tokens.shape[0])[None]
    segments = jnp.ones_like(positions)
    hidden, kv = model.apply(v, tokens[None], positions, segments, method=MTPModel.regular)
    mask_h = model.apply(v, params["mask_embedding"], anchors, positions[:, anchors], segments, kv,
                         method=MTPModel.mask_hidden)[0]
    logits_of = functools.partial(model.apply, v, method=lambda m, h: m.base.logits(h))

    def argmax(logits):  # <mask> is never a prediction (as in torch_reference)
        return jnp.argmax(logits.at[..., mask_id].set(-jnp.inf) if mask_id < logits.shape[-1] else logits, -1)

    base_logits = logits_of(hidden[0])
    prev, steps, drafts = argmax(base_logits[anchors]), [], []
    for j in range(model.mtp.draft_length):
        e = model.apply(v, prev, method=lambda m, t: m.base.embed(t))
        logits = logits_of(model.apply(v, e, mask_h[:, j], method=lambda m, e, h: m.sampler(e, h)))
        prev = argmax(logits)
        steps.append(logits)
        drafts.append(prev)
    return base_logits, jnp.stack(steps, 1), jnp.stack(drafts, 1)


def sample_tokens(texts, tokenizer, n: int = 24) -> np.ndarray:
    return np.asarray(tokenizer(" ".join(texts), add_special_tokens=False)["input_ids"][:n], np.int32)


def real_columns(vocab: int, mask_id: int) -> np.ndarray:
    """Columns both sides share: the JAX base's vocab without the `<mask>` column (whose row export sets)."""
    return np.asarray([i for i in range(vocab) if i != mask_id])


def parity(r, ref: torch_reference.MTPReference, tokens: np.ndarray) -> dict[str, float]:
    """Max |JAX - torch| of regular-token logits and of draft logits (fp32, columns both share), whether
    the draft tokens agree, and how far the drafts move without the adapters (the test's power)."""
    anchors = np.arange(len(tokens), dtype=np.int32)  # every position, first and last included
    fn = jax.jit(functools.partial(jax_drafts, r.model, r.mask_id))
    base, drafts, draft_tokens = (np.asarray(x) for x in fn(r.params, tokens, anchors))
    got = ref.draft_logits(tokens, anchors)
    regular = ref.base_logits(torch.as_tensor(tokens[None], dtype=torch.long))[0].numpy()
    cols = real_columns(r.model.config.vocab_size, r.mask_id)
    no_lora = {**r.params, "lora": jax.tree.map(jnp.zeros_like, r.params["lora"])}
    return {"tol": tolerance(regular[:, cols], got.logits.numpy()[..., cols]),
            "regular": float(np.abs(base[:, cols] - regular[:, cols]).max()),
            "draft": float(np.abs(drafts[..., cols] - got.logits.numpy()[..., cols]).max()),
            "same_drafts": bool(np.array_equal(got.tokens.numpy(), draft_tokens)),
            "lora_effect": float(np.abs(np.asarray(fn(no_lora, tokens, anchors)[1]) - drafts).max())}


def check_parity(r, out: Path, tokens: np.ndarray, what: str):
    d = parity(r, torch_reference.load(out), tokens)
    tol = d["tol"]
    print(f"{what}: max |JAX - torch| regular {d['regular']:.2e}, draft {d['draft']:.2e} (tolerance {tol:.2e}); "
          f"LoRA moves drafts by {d['lora_effect']:.2e}")
    assert d["regular"] < tol, f"{what}: regular-token logits differ from JAX by {d['regular']:.2e}"
    assert d["draft"] < tol, f"{what}: draft logits differ from JAX by {d['draft']:.2e}"
    assert d["same_drafts"], f"{what}: draft tokens differ from JAX"
    assert d["lora_effect"] > 100 * tol, \
        f"{what}: LoRA moves the drafts by only {d['lora_effect']:.2e}; the comparison could not see a bad adapter"


def test_hf_dir_loads_clean(exported):
    """from_pretrained: no missing/unexpected keys, no warnings; <mask> in the table, tokenizer, generation config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(exported.out, output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    assert not any(info.values()), f"loading info not clean: {info}"
    assert not [x for x in records if x.levelno >= logging.WARNING], \
        f"transformers warned: {[x.getMessage() for x in records]}"

    r = exported.run
    assert model.config.vocab_size == max(r.model.config.vocab_size, r.mask_id + 1), "config.json vocab_size"
    table = model.get_input_embeddings().weight.detach().numpy()
    np.testing.assert_array_equal(table[r.mask_id], np.asarray(r.params["mask_embedding"]),
                                  err_msg="<mask> embedding row is not the run's mask row")
    if not model.config.tie_word_embeddings:
        assert not model.get_output_embeddings().weight[r.mask_id].any(), "untied lm_head <mask> row is not zero"
    tokenizer = AutoTokenizer.from_pretrained(exported.out)
    assert tokenizer.convert_tokens_to_ids("<mask>") == r.mask_id, "tokenizer: <mask> id"
    assert "<mask>" in tokenizer.all_special_tokens, "tokenizer: <mask> is not a special token"
    gen = json.loads((exported.out / "generation_config.json").read_text())
    assert r.mask_id in gen["suppress_tokens"], "generation_config does not suppress <mask>"


def test_exported_model_equals_jax(exported):
    """transformers' regular logits == JAX base; torch_reference drafts (interleaved sequence, dense 4D mask,
    LoRA hooks) == JAX two-stream mask stream + sampler head; fp32, < 1e-4."""
    check_parity(exported.run, exported.out, sample_tokens(exported.texts, exported.run.tokenizer), exported.kind)


def test_adapter_is_unfused_peft_layout(exported):
    """mtp_adapter.safetensors: one lora_A [r, in] / lora_B [out, r] per adapted projection, sampler head."""
    from safetensors.numpy import load_file

    r = exported.run
    c, lora = r.model.config, r.config.lora
    tensors = load_file(str(exported.out / ADAPTER_FILE))
    cfg = json.loads((exported.out / MTP_CONFIG_FILE).read_text())
    assert cfg["lora"]["fused"] is False and cfg["lora"]["fused_in_training"] == lora.fuse
    assert cfg["draft_length"] == r.config.mtp.draft_length and cfg["mask_token_id"] == r.mask_id
    shapes = {"q_proj": (c.hidden_size, c.q_features), "v_proj": (c.hidden_size, c.kv_features),
              "o_proj": (c.q_features, c.hidden_size), "down_proj": (c.intermediate_size, c.hidden_size)}
    n_fused = {"q_proj": 2 if lora.fuse else 1, "v_proj": 2 if lora.fuse else 1}  # qwen3 fuses q|v (k off)
    for module, (fan_in, fan_out) in shapes.items():
        group = n_fused.get(module, 1)
        prefix = f"model.layers.1.{'mlp' if module == 'down_proj' else 'self_attn'}.{module}"
        assert tensors[f"{prefix}.lora_A.weight"].shape == (lora.rank * group, fan_in), f"{prefix}.lora_A"
        assert tensors[f"{prefix}.lora_B.weight"].shape == (fan_out, lora.rank * group), f"{prefix}.lora_B"
        assert cfg["lora"]["scale"][module] == pytest.approx(lora.scale(group)), f"{module} scale"
    assert (f"model.layers.0.self_attn.k_proj.lora_A.weight" in tensors) == ("k" in lora.targets)
    assert not any("qkv_proj" in k or "gate_up_proj" in k for k in tensors), "fused names leaked"
    assert tensors["mtp_sampler.fc1.weight"].shape == (c.hidden_size, 2 * c.hidden_size)
    assert {k for k in tensors if k.startswith("mtp_sampler.")} == {
        f"mtp_sampler.{n}.weight" for n in ("fc1", "fc2", "norm1", "norm2")}
    if lora.fuse:  # shared A copied to each projection of the group
        np.testing.assert_array_equal(tensors["model.layers.0.self_attn.q_proj.lora_A.weight"],
                                      tensors["model.layers.0.self_attn.v_proj.lora_A.weight"])


def test_round_trip_load_model(exported):
    """load_model(out_dir) == load_model(base dir), plus the `<mask>` rows."""
    _, ours, _ = load_model(exported.out)
    _, base, config = load_model(exported.base)
    r = exported.run
    real = real_columns(config.vocab_size, r.mask_id)
    flat_out = dict(jax.tree_util.tree_flatten_with_path(ours)[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(base)[0]:
        got, leaf = np.asarray(flat_out[path]), np.asarray(leaf)
        name = jax.tree_util.keystr(path)
        if "embed_tokens" in name:
            np.testing.assert_array_equal(got[r.mask_id], np.asarray(r.params["mask_embedding"]), err_msg=name)
            got, leaf = got[real], leaf[real]
        elif "lm_head" in name:
            assert not got[:, r.mask_id].any(), "lm_head <mask> column is not zero"
            got, leaf = got[:, real], leaf[:, real]
        np.testing.assert_array_equal(got, leaf, err_msg=f"{name} changed in the round trip")


def test_sharded_bf16_export(exported, tmp_path):
    """A tiny max shard size gives shards + index that transformers loads; bf16 tensors == fp32 export cast."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = export(exported.run_dir, tmp_path / "sharded", dtype="bfloat16", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and not (out / "model.safetensors").exists(), f"not sharded: {files}"
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), f"sharded load not clean: {info}"
    assert model.dtype == torch.bfloat16
    with safe_open(str(exported.out / "model.safetensors"), "pt") as ref:
        for name, file in index["weight_map"].items():
            with safe_open(str(out / file), "pt") as f:
                assert torch.equal(f.get_tensor(name), ref.get_tensor(name).to(torch.bfloat16)), name
    sizes = [(out / f).stat().st_size for f in files]
    assert sum(sizes) >= index["metadata"]["total_size"]


def test_bad_input_is_refused_and_nothing_written(exported, tmp_path, capsys):
    """No checkpoint, a missing step, a torn checkpoint, a non-empty out_dir: clear errors, no output."""
    run_dir = exported.run_dir

    def refused(run, match, out=None):
        out = out or tmp_path / "out"
        with pytest.raises((CheckpointError, ExportError), match=match):
            export(run, out)
        leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
        assert not leftovers, f"temp dirs left behind: {leftovers}"

    with pytest.raises(CheckpointError, match="step 999"):
        export(run_dir, tmp_path / "out", step=999)
    assert not (tmp_path / "out").exists()

    empty = tmp_path / "no_ckpt"
    shutil.copytree(run_dir, empty, ignore=shutil.ignore_patterns("checkpoints"))
    refused(empty, "no committed checkpoint")

    torn = tmp_path / "torn"
    shutil.copytree(run_dir, torn)
    for f in (torn / "checkpoints").rglob("*"):
        if f.is_file() and f.parent.name == "d":  # orbax's array data files
            f.write_bytes(f.read_bytes()[:7])
    refused(torn, "torn or unreadable")

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    refused(run_dir, "not empty; pass --overwrite", busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"], "a refused export touched out_dir"
    assert main(["--run_dir", str(run_dir), "--out", str(busy)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    refused(run_dir, "would replace", run_dir)

    # a base model that breaks mid-export (a tensor missing): --overwrite leaves the old out_dir whole
    from safetensors.numpy import load_file, save_file

    broken_base, broken_run = tmp_path / "broken_base", tmp_path / "broken_run"
    shutil.copytree(exported.base, broken_base)
    tensors = load_file(str(broken_base / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(broken_base / "model.safetensors"), metadata={"format": "pt"})
    shutil.copytree(run_dir, broken_run)
    saved = yaml.safe_load((broken_run / "config.yaml").read_text())
    saved["model"]["path"] = str(broken_base)
    (broken_run / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ModelLoadError, match="model.norm.weight"):
        export(broken_run, busy, overwrite=True)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"], "a failed --overwrite export destroyed out_dir"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".busy.")], "temp dir left behind"

    export(run_dir, busy, overwrite=True)  # --overwrite replaces the directory whole
    assert not (busy / "keep.txt").exists() and (busy / "config.json").is_file()


# runs the export CLI, sampling the process's anonymous resident memory (RssAnon: what it needs; its RSS
# also counts the mmapped source pages it read, which are page cache) from after the imports to the end
RSS_SCRIPT = r"""
import re, sys, threading, time
import jax, orbax.checkpoint, torch, transformers, mtp_jax.checkpoints, mtp_jax.models
from mtp_jax.export import main

def anon():
    return int(re.search(r"RssAnon:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024

peak, start = [0.0], anon()

def sample():
    while True:
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)

threading.Thread(target=sample, daemon=True).start()
rc = main(sys.argv[1:])
print(f"ANON {start:.0f} {max(peak[0], anon()):.0f}")
sys.exit(rc)
"""


@pytest.mark.slow
def test_smollm2_default_run(tmp_path):
    """The embedded default (SmolLM2-135M-Instruct, k=4) after 3 steps: fp32 export equals JAX; the bf16
    CLI export streams: its anonymous memory grows by less than the model's size while exporting."""
    jax.config.update("jax_compilation_cache_dir", COMPILE_CACHE)
    cfg = load_config(Config, ROOT / "configs" / "smollm2_k4.yaml", [
        "--train.save_dir", str(tmp_path / "run"), "--train.max_steps", "3", "--optim.warmup_steps", "0",
        "--data.eval_file", "null", "--data.cache_dir", str(tmp_path / "cache"), "--train.progress", "false"])
    run_dir = run(cfg)["run_dir"]
    r = load_run(run_dir)
    out = export(run_dir, tmp_path / "fp32", dtype="float32")
    text = "Write a Python function that returns the sum of a list of numbers, and explain it briefly."
    check_parity(r, out, sample_tokens([text], r.tokenizer, 32), "smollm2")

    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, "--run_dir", str(run_dir), "--out",
                           str(tmp_path / "bf16")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    start, peak = (float(x) for x in proc.stdout.split("ANON")[-1].split())
    model_mib = (out / "model.safetensors").stat().st_size / 2**20
    print(f"bf16 export of a {model_mib:.0f} MiB fp32 model: anonymous memory {start:.0f} -> peak {peak:.0f} MiB; "
          + proc.stderr.strip().splitlines()[-1])
    assert peak - start < model_mib, f"export took {peak - start:.0f} MiB for a {model_mib:.0f} MiB model"


def test_float32_trainables_over_a_bf16_base(tmp_path):
    """model.trainable_dtype float32 over a bf16 base (the 8B configs' setting), through checkpoint, export and
    decoding: the run's checkpoint gives float32 adapters and sampler beside the bf16 base, an fp32 export writes
    them unrounded (they hold values bf16 cannot), and exact speculative decoding with them equals exact plain
    decoding."""
    from safetensors.numpy import load_file

    from mtp_jax.decoding.adapter import load_adapter
    from mtp_jax.decoding.plain import generate
    from mtp_jax.decoding.request import eos_ids_of
    from mtp_jax.decoding.speculative import speculative_generate

    data = write_data(tmp_path / "train.jsonl")
    base = save_hf(make_hf_model("llama"), tmp_path / "base")
    texts = [v for line in open(data) for v in json.loads(line).values()]
    tiny_tokenizer(TOKENIZER_SIZE["llama"], texts).save_pretrained(base)
    run_dir = train_run(tmp_path, str(base), data, *RUN_OVERRIDES["llama"], "--model.dtype", "bfloat16",
                        "--model.param_dtype", "bfloat16", "--model.trainable_dtype", "float32")
    r = load_run(run_dir)
    dtypes = lambda tree: {x.dtype for x in jax.tree.leaves(tree)}  # noqa: E731
    assert dtypes(r.params["lora"]) | dtypes(r.params["sampler"]) == {jnp.dtype(jnp.float32)}
    assert dtypes(r.params["base"]) == {jnp.dtype(jnp.bfloat16)}
    fc1 = np.asarray(r.params["sampler"]["fc1"]["kernel"]).T
    assert not np.array_equal(fc1, fc1.astype(jnp.bfloat16).astype(np.float32)), "trained values fit bf16"
    tensors = load_file(str(export(run_dir, tmp_path / "out", dtype="float32") / ADAPTER_FILE))
    np.testing.assert_array_equal(tensors["mtp_sampler.fc1.weight"], fc1)

    model, params, tok = load_adapter(run_dir)
    prompts = [tok(t)["input_ids"] for t in texts[:2]]
    eos = eos_ids_of(tok, model.config)
    res = speculative_generate(model, params, prompts, 12, eos, exact=True)
    assert res.tokens == generate(model, params, prompts, 12, eos, exact=True)
