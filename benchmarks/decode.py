"""Decoding cost at real sizes against the weight-read floor and a transformers `generate` peer (issue 24).

    python benchmarks/decode.py                       # full run on one GPU
    python benchmarks/decode.py --only qwen3-8b --batches 1,4          # one slice of it
    python benchmarks/decode.py --only smollm2-135m --adapter RUN_DIR --distill
    python benchmarks/decode.py --smoke               # tiny shapes, CPU, end to end

On the GPU machine, in calls of at most 10 minutes (SmolLM2 from its GGUF, e.g. --smollm2 PATH.gguf,
where the alias cannot be fetched), then one report:
    python benchmarks/decode.py --only qwen3-8b --no_exactness --out $OUT/decode_qwen.json
    python benchmarks/decode.py --only llama-3.1-8b,smollm2-135m [--adapter RUN] --distill --out $OUT/decode_rest.json
    python benchmarks/decode.py --merge decode_qwen.json decode_rest.json --out benchmarks/results/decode_DATE_h100.json

Rows, for each model (`qwen3-8b`, `llama-3.1-8b`: random bf16 weights at configs/models/*.json shapes;
`smollm2-135m`: its real weights) and batch: `plain` (our greedy decoding), `spec_all` / `spec_0`
(speculative, k drafts, mask-block layout `all` or `0`; random adapters unless `--adapter`, so their
acceptance is about 0 and the row measures the cost of a call), with `--draft_vocab N` also `spec_0_vocab`
(layout `0`, the drafts scored over N token ids only: the cost of such a call), `hf_generate` (transformers, bf16,
static cache, greedy, eager) and `hf_generate_compiled` (the same with generate's torch.compile, where
it runs; the error is recorded where not). Every method generates exactly `new_tokens` per row (no
EOS), from the same left-padded prompts.

ms_per_call = (time of a generation of N tokens - time of a generation of 1 token) / (model calls - 1):
the cost of one decoding call with the prompt's call taken out (plain and peer: N calls; speculative:
the calls it made). tokens_per_s = tokens generated after each row's first / that same time.
floor_ms = weight bytes / copy bandwidth, the copy bandwidth measured in the same run as
2 x bytes / median time of an in-place `x + 1` over a large device array (bytes read plus bytes
written per second), so floor_ms is the time to read every weight once at the rate a copy moves bytes.

`exactness`: SmolLM2 in bf16 on held-out prompts, speculative greedy vs plain greedy; per mismatch the
first differing index and the plain decoder's own top-2 logit margin there (the logits its token
came from), a near-tie when that margin is within `near_tie_ulps` bf16 spacings of
the top logit (`near_tie`). `--distill`: SmolLM2's distillation throughput (greedy answers to real
prompts at batch 64 and 256), ours and the peer's (eager, and compiled on a GPU). Phases: the peer (in
a child process, gone before ours run), ours, exactness, our distillation; the JSON is written after
each (benchmarks/results/decode_<date>_<device>.json or --out, `complete` false until the last), so a
run cut by a time limit keeps what it measured. It prints a table with ratios against the floor, plain
decoding and the peer of the same run.
"""

from __future__ import annotations

import os

# JAX must not take 75% of the GPU before the torch peer runs: allocate on demand.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mtp_jax.decoding.request import encode_prompt, eos_ids_of, left_pad  # noqa: E402
from mtp_jax.models import LoRAConfig, ModelConfig, load_model, load_tokenizer  # noqa: E402
from mtp_jax.models.llama import CausalLM  # noqa: E402
from mtp_jax.models.loading import resolve_model_dir  # noqa: E402
from mtp_jax.mtp.model import MTPConfig, MTPModel  # noqa: E402
from mtp_jax.mtp.objective import init_params  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _report import device_tag, write_json  # noqa: E402

MODELS = {"qwen3-8b": "configs/models/qwen3-8b.json", "llama-3.1-8b": "configs/models/llama-3.1-8b.json",
          "smollm2-135m": None}  # None: real weights (--smollm2)
DEFAULT_BATCHES = {"qwen3-8b": "1,4,16,64", "llama-3.1-8b": "1,8", "smollm2-135m": "1,8"}
PROMPT_TOKENS = 48  # random prompts of the 8B shapes: about a chat-templated held-out prompt
NEVER = [-1]  # an EOS id no token has: every row generates exactly new_tokens
SMOKE_SHAPES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, vocab_size=512)


# ---------------------------------------------------------------------------------------------------
# The decoding API, in one place.
# ---------------------------------------------------------------------------------------------------
from mtp_jax.decoding.adapter import MERGED_DEFAULT, load_adapter  # noqa: E402
from mtp_jax.decoding.cli import compile_seconds  # noqa: E402
from mtp_jax.decoding.exactness import NEAR_TIE_ULPS, divergence  # noqa: E402
from mtp_jax.decoding.layout import layout_name, plain_of, prepare  # noqa: E402
from mtp_jax.decoding.plain import generate, generate_with_logits  # noqa: E402
from mtp_jax.decoding.speculative import speculative_generate, with_draft_vocab  # noqa: E402


def plain_decode(lm, base, prompts, new_tokens, eos, pad_id, exact=False, anchors=None
                 ) -> tuple[list[list[int]], int]:
    """(tokens per row, model calls of the batch). exact: `lm, base` are the MTPModel's, and `anchors` the
    speculative layout whose call shape exact plain decoding runs in."""
    kw = {"exact": True, "anchors": anchors} if exact else {}
    out = generate(lm, base, prompts, new_tokens, eos, pad_id=pad_id, **kw)
    return out, max(map(len, out))


def spec_decode(model, params, prompts, new_tokens, eos, pad_id, anchors, exact=False) -> tuple[list[list[int]], int]:
    kw = {"exact": True} if exact else {}
    res = speculative_generate(model, params, prompts, new_tokens, eos, pad_id=pad_id, anchors=anchors, **kw)
    return res.tokens, int(res.steps.max())

# ---------------------------------------------------------------------------------------------------


LAYOUTS = {"spec_all": None, "spec_0": (0,)}


def median_seconds(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def per_call(fn, new_tokens: int, batch: int, repeats: int) -> dict:
    """ms_per_call and tokens_per_s of `fn(n) -> (tokens per row, calls)` from generations of n and of 1
    token (each compiled / warmed up first)."""
    t0 = time.perf_counter()
    with compile_seconds() as compiling:  # JAX's; torch compiles inside these warm-up calls too
        fn(1), fn(new_tokens), fn(new_tokens)  # compile; CUDA graphs record on a later call
    warmup_s = time.perf_counter() - t0
    t1, _ = median_seconds(lambda: fn(1), repeats)
    tn, (tokens, calls) = median_seconds(lambda: fn(new_tokens), repeats)
    decode_s = max(tn - t1, 1e-9)
    n_tokens = sum(map(len, tokens))
    if n_tokens != batch * new_tokens:
        raise RuntimeError(f"{n_tokens} tokens generated, expected {batch} x {new_tokens}: an EOS stopped a row")
    return {"below_noise": tn <= t1,  # the N-token generation was not slower: no figure (tiny CPU shapes)
            "ms_per_call": round(1e3 * decode_s / max(calls - 1, 1), 4),
            "tokens_per_s": round((n_tokens - batch) / decode_s, 2), "calls": calls,
            "ms_generate": round(1e3 * tn, 3), "ms_prefill": round(1e3 * t1, 3), "warmup_s": round(warmup_s, 1),
            "jax_compile_s": round(compiling[0], 1)}


# ---------------------------------------------------------------- floor
def copy_bandwidth(gigabytes: float, repeats: int = 7) -> float:
    """Bytes per second moved by an in-place elementwise pass over a device array: 2 x size (read + write)
    / median time. An integer add (not `x + 0`, which XLA folds away) on a donated buffer."""
    n = int(gigabytes * 2 ** 30) // 4
    x = jnp.zeros((n,), jnp.uint32)
    step = jax.jit(lambda a: a + 1, donate_argnums=0)
    x = step(x).block_until_ready()  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x = step(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    del x
    return 2 * n * 4 / statistics.median(times)


def weight_bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def spec_bound(config: ModelConfig, base, params, k: int, draft_vocab: int = 0) -> float:
    """The least a speculative call can cost, in plain calls, where both read their weights once at the
    same rate: the drafts come one after another (draft j's sampler input embeds draft j - 1, SPEC §4),
    so each of the k reads the sampler head and the whole lm_head (its argmax is over the full
    vocabulary; with a drafting vocabulary of `draft_vocab` ids, those columns) once more, after the
    call's one read of the base and the adapters."""
    model = base["model"]
    head = (model["embed_tokens"]["embedding"] if config.tie_word_embeddings else base["lm_head"]["kernel"])
    adapters = weight_bytes({key: v for key, v in params.items() if key not in ("base", "sampler")})
    share = min(draft_vocab, config.vocab_size) / config.vocab_size if draft_vocab else 1.0
    draft = k * (weight_bytes(head) * share + weight_bytes(params["sampler"]))
    return (weight_bytes(base) + adapters + draft) / weight_bytes(base)


# ---------------------------------------------------------------- models
def model_config(name: str, smoke: bool, smollm2: str) -> tuple[ModelConfig, dict]:
    """(our config, the HF config dict) of `name` (tiny shapes with --smoke, except SmolLM2's real ones)."""
    path = MODELS[name]
    hf = json.loads((resolve_model_dir(smollm2) / "config.json").read_text() if path is None
                    else (ROOT / path).read_text())
    if smoke and path is not None:
        hf = {**hf, **SMOKE_SHAPES}
    return ModelConfig.from_hf(hf), hf


def random_base(lm: CausalLM, seed: int = 0):
    from mtp_step import random_base as make  # benchmarks/mtp_step.py: one jitted init on the device

    return make(lm, seed)


def mtp_model(config: ModelConfig, base, dtype, k: int, seed: int = 0):
    """MTPModel (LoRA r16 on all projections, k drafts) with random adapters beside `base`: the shapes of
    speculative.py --random; its drafts are about never accepted."""
    model = MTPModel(config, LoRAConfig(rank=16, alpha=32.0), MTPConfig(draft_length=k), dtype, dtype)
    params = init_params(model, base, jnp.zeros((config.hidden_size,), jnp.float32), jax.random.key(seed))
    rng = np.random.default_rng(seed)
    params["lora"] = jax.tree.map(lambda x: jnp.asarray(0.01 * rng.standard_normal(x.shape), x.dtype), params["lora"])
    return model, params


def random_models(path: str, tiny: bool, dtype, k: int = 4):
    """(CausalLM, MTPModel, its params) at the shapes of config.json `path` (`tiny`: its layer count at
    SMOKE_SHAPES' widths), random weights and random adapters (`mtp_model`)."""
    hf = json.loads(Path(path).read_text())
    if tiny:
        hf = {**hf, **{key: v for key, v in SMOKE_SHAPES.items() if key != "num_hidden_layers"}}
    config = ModelConfig.from_hf(hf)
    lm = CausalLM(config, None, dtype, dtype)
    return (lm, *mtp_model(config, random_base(lm), dtype, k))


def prompt_ids(name: str, config: ModelConfig, batch: int, tokenizer) -> list[list[int]]:
    """Held-out prompts (chat template) for SmolLM2, cycled to the batch; random tokens for the 8B shapes."""
    if tokenizer is None:
        rng = np.random.default_rng(batch)
        return [rng.integers(0, config.vocab_size, PROMPT_TOKENS).tolist() for _ in range(batch)]
    texts = [r["input"] for r in read_prompts()]
    return [encode_prompt(tokenizer, texts[i % len(texts)], chat=True) for i in range(batch)]


def read_prompts(per_domain: int | None = None) -> list[dict]:
    from mtp_jax.data.readers import resolve_data_file

    rows, seen = [], {}
    with open(resolve_data_file("builtin:heldout_prompts.jsonl"), encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            seen[rec["category"]] = seen.get(rec["category"], 0) + 1
            if per_domain is None or seen[rec["category"]] <= per_domain:
                rows.append(rec)
    return rows


# ---------------------------------------------------------------- the torch peer
def hf_rows(name: str, hf_config: dict, smollm2: str, batches: list[int], new_tokens: int, repeats: int,
            prompts_of, pad_id: int, over) -> list[dict]:
    """hf_generate (and hf_generate_compiled) rows; a failure becomes a row with `error`."""
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    with torch.device(device):
        if MODELS[name] is None:
            model = transformers.AutoModelForCausalLM.from_pretrained(resolve_model_dir(smollm2), dtype=torch.bfloat16)
        else:
            cfg = transformers.AutoConfig.for_model(**hf_config)
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = model.to(device).eval()
    model.generation_config.eos_token_id = None  # exactly new_tokens per row, as ours
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows = []
    variants = peer_variants(cuda)
    for batch in batches:
        if over():
            rows.append({"model": name, "batch": batch, "method": "hf_generate", "error": "skipped: --budget_s"})
            continue
        tokens, pad_len = left_pad(prompts_of(batch), pad_id)
        input_ids = torch.as_tensor(tokens, dtype=torch.long, device=device)
        mask = torch.as_tensor(np.arange(tokens.shape[1])[None] >= pad_len[:, None], dtype=torch.long, device=device)
        for method, tries in variants.items():
            def fn(n, extra):
                with torch.inference_mode():
                    out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                         cache_implementation="static", pad_token_id=pad_id, **extra)
                sync()
                new = out[:, input_ids.shape[1]:].cpu().numpy()
                return [row.tolist() for row in new], n

            got, errors = first_that_runs(tries, lambda extra: per_call(lambda n: fn(n, extra), new_tokens, batch,
                                                                         repeats))
            row = {"model": name, "batch": batch, "method": method, **got}
            if errors:
                row["errors"] = errors
            if "ms_per_call" not in row:
                row["error"] = "; ".join(errors)
            rows.append(row)
            print(f"  {name} b={batch} {method}: " + (f"{row['ms_per_call']:.3f} ms/call" if "error" not in row
                                                      else row["error"][:200]), flush=True)
    if not cuda:
        rows += [{"model": name, "batch": b, "method": "hf_generate_compiled", "error": "skipped: no CUDA"}
                 for b in batches]
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return rows


def peer_variants(cuda: bool) -> dict[str, list[tuple[str, dict]]]:
    """Peer method -> the (mode, `generate` kwargs) to try in turn. `generate` compiles the forward of a
    static-cache decode itself on GPU: off for the eager row; the compiled row tries CUDA graphs first,
    then inductor without them."""
    import transformers

    variants = {"hf_generate": [("eager", dict(disable_compile=True))]}
    if cuda:
        variants["hf_generate_compiled"] = [(mode, dict(compile_config=transformers.CompileConfig(mode=mode)))
                                            for mode in ("reduce-overhead", "default")]
    return variants


def first_that_runs(tries: list[tuple[str, dict]], run) -> tuple[dict, list[str]]:
    """({"mode", **run(kwargs)} of the first (mode, kwargs) of `tries` whose run returns, or {} if none does;
    the errors of those that raised)."""
    import torch

    errors = []
    for mode, extra in tries:
        try:
            return {"mode": mode, **run(extra)}, errors
        except Exception as e:  # noqa: BLE001 - the peer's failure is a result to report, not a crash
            errors.append(f"{mode}: {type(e).__name__}: {str(e)[:500]}")
            torch._dynamo.reset()
    return {}, errors


# ---------------------------------------------------------------- ours
def smollm2_models(args) -> tuple:
    """(MTPModel, params) of SmolLM2's real weights with the run's adapter (`--adapter`), else random
    adapters beside them."""
    if args.adapter:
        model, params, _ = load_adapter(args.adapter, args.smollm2, dtype="bfloat16", merged=args.merged)
        return model, params
    _, base, config = load_model(args.smollm2, "bfloat16")
    return mtp_model(config, base, jnp.bfloat16, args.k)


def jax_rows(name: str, config: ModelConfig, args, batches: list[int], new_tokens: int, prompts_of, pad_id: int,
             bytes_per_ms: float, over) -> tuple[list[dict], dict]:
    dtype = jnp.bfloat16
    lm = CausalLM(config, None, dtype, dtype)
    if MODELS[name] is None:
        model, params = smollm2_models(args)
    else:
        model, params = mtp_model(config, random_base(lm), dtype, args.k)
    base = params["base"]
    info = {"weight_bytes": weight_bytes(base), "adapter_bytes": weight_bytes({k: v for k, v in params.items()
                                                                               if k != "base"}),
            "adapter": args.adapter if MODELS[name] is None and args.adapter else "random",
            "k": model.mtp.draft_length}
    info["spec_bound_x_plain"] = round(spec_bound(config, base, params, model.mtp.draft_length), 4)
    print(f"  {name}: a speculative call reads {info['spec_bound_x_plain']:.3f}x a plain call's bytes "
          f"(k = {model.mtp.draft_length} more lm_head and sampler reads)", flush=True)
    if args.draft_vocab:
        info["spec_vocab_bound_x_plain"] = round(spec_bound(config, base, params, model.mtp.draft_length,
                                                            args.draft_vocab), 4)
        print(f"  {name}: with a drafting vocabulary of {args.draft_vocab} ids, "
              f"{info['spec_vocab_bound_x_plain']:.3f}x", flush=True)
    floor = round(info["weight_bytes"] / bytes_per_ms, 4)
    spec_m, spec_p = prepare(model, params, args.merged)
    info["layout"] = layout_name(spec_m)
    plain_m, plain_p = plain_of(spec_m, spec_p)
    methods = {"plain": lambda p, n, x: plain_decode(spec_m, spec_p, p, n, NEVER, pad_id, True, LAYOUTS["spec_0"])
               if x else plain_decode(plain_m, plain_p, p, n, NEVER, pad_id)}
    for method, anchors in LAYOUTS.items():
        methods[method] = lambda p, n, x, a=anchors: spec_decode(spec_m, spec_p, p, n, NEVER, pad_id, a, exact=x)
    if args.draft_vocab:  # ids 0 .. N-1: the cost of a call (which ids only changes what gets accepted)
        vocab_p = with_draft_vocab(spec_m, spec_p, range(min(args.draft_vocab, config.vocab_size)))
        methods["spec_0_vocab"] = lambda p, n, x: spec_decode(spec_m, vocab_p, p, n, NEVER, pad_id, LAYOUTS["spec_0"],
                                                              exact=x)
    rows = []
    for batch in batches:
        if over():
            rows.append({"model": name, "batch": batch, "method": "plain", "error": "skipped: --budget_s"})
            continue
        prompts = prompts_of(batch)
        variants = [(m, False) for m in methods] + ([("plain", True), ("spec_0", True)] if batch == 1 else [])
        for method, x in variants:
            row = {"model": name, "batch": batch, "method": method + ("_exact" if x else ""), "floor_ms": floor}
            row |= per_call(lambda n: methods[method](prompts, n, x), new_tokens, batch, args.repeats)
            rows.append(row)
            print(f"  {name} b={batch} {row['method']}: {row['ms_per_call']:.3f} ms/call, "
                  f"{row['tokens_per_s']:.1f} tokens/s (floor {floor:.3f} ms)", flush=True)
    return rows, {**info, "floor_ms": floor}


def distill_rows(args, pad_id) -> list[dict]:
    """Distillation throughput of SmolLM2's base model in the decoding layout: greedy answers to real
    prompts, stopping at EOS, generated tokens / s."""
    lm, base = plain_of(*prepare(*smollm2_models(args)))
    tok = load_tokenizer(args.smollm2)
    eos = [tok.eos_token_id]
    texts = [r["input"] for r in read_prompts()]
    out = []
    for batch in args.distill_batches:
        prompts = [encode_prompt(tok, texts[i % len(texts)], chat=True) for i in range(batch)]
        plain_decode(lm, base, prompts, args.distill_tokens, eos, pad_id)
        s, (tokens, _) = median_seconds(lambda: plain_decode(lm, base, prompts, args.distill_tokens, eos, pad_id), 2)
        n = sum(map(len, tokens))
        out.append({"batch": batch, "method": "plain", "tokens": n, "seconds": round(s, 3),
                    "tokens_per_s": round(n / s, 1)})
        print(f"  distill b={batch} plain: {n / s:.0f} tokens/s", flush=True)
    return out


def hf_distill_rows(args, pad_id) -> dict[str, list[dict]]:
    """Peer method (`peer_variants`) -> its distillation rows, one per batch of `args.distill_batches`."""
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    tok = load_tokenizer(args.smollm2)
    model = transformers.AutoModelForCausalLM.from_pretrained(resolve_model_dir(args.smollm2),
                                                              dtype=torch.bfloat16).to(device).eval()
    texts = [r["input"] for r in read_prompts()]
    variants = peer_variants(cuda)
    out = {method: [] for method in variants}
    for batch in args.distill_batches:
        tokens, pad_len = left_pad([encode_prompt(tok, texts[i % len(texts)], chat=True) for i in range(batch)], pad_id)
        ids = torch.as_tensor(tokens, dtype=torch.long, device=device)
        mask = torch.as_tensor(np.arange(tokens.shape[1])[None] >= pad_len[:, None], dtype=torch.long, device=device)

        def run(extra):
            def fn():
                with torch.inference_mode():
                    gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.distill_tokens,
                                         do_sample=False, cache_implementation="static", pad_token_id=pad_id,
                                         eos_token_id=tok.eos_token_id, **extra)
                if cuda:
                    torch.cuda.synchronize()
                return gen[:, ids.shape[1]:].cpu().numpy()

            fn()
            s, gen = median_seconds(fn, 2)
            n = int(sum((np.argmax(row == tok.eos_token_id) + 1) if (row == tok.eos_token_id).any() else len(row)
                        for row in gen))
            return {"tokens": n, "seconds": round(s, 3), "tokens_per_s": round(n / s, 1)}

        for method, tries in variants.items():
            got, errors = first_that_runs(tries, run)
            row = {"batch": batch, "method": method, **got}
            if errors:
                row["errors"] = errors
            if "tokens_per_s" not in row:
                row["error"] = "; ".join(errors)
            out[method].append(row)
            print(f"  distill b={batch} {method}: " + (f"{row['tokens_per_s']:.0f} tokens/s" if "error" not in row
                                                        else row["error"][:200]), flush=True)
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------- exactness
def exactness(args, pad_id) -> dict:
    """Speculative vs plain greedy in bf16 on held-out prompts, one prompt per call."""
    tok = load_tokenizer(args.smollm2)
    spec_m, spec_p = prepare(*smollm2_models(args), args.merged)
    plain_m, plain_p = plain_of(spec_m, spec_p)
    eos = eos_ids_of(tok, spec_m.config)
    anchors = LAYOUTS[f"spec_{args.exact_layout}"]
    records, mismatches, not_tie, exact_mismatches = [], 0, 0, 0
    for rec in read_prompts(args.exact_prompts)[:1 if args.smoke else None]:
        ids = encode_prompt(tok, rec["input"], chat=True)
        (plain,), (plain_logits,) = generate_with_logits(plain_m, plain_p, [ids], args.exact_tokens, eos,
                                                         pad_id=pad_id)
        spec = spec_decode(spec_m, spec_p, [ids], args.exact_tokens, eos, pad_id, anchors)[0][0]
        entry = {"id": rec["id"], "tokens": len(plain), "equal": spec == plain}
        # the plain decoder's own logits where the two part
        d = divergence(plain_m, plain_p, ids, plain, spec, np.asarray(plain_logits), args.near_tie_ulps)
        if d is not None:
            mismatches += 1
            not_tie += not d.near_tie
            entry |= {"first_difference": d.index, "top2_margin": round(d.margin, 5), "near_tie": d.near_tie,
                      "plain_token": d.plain_token, "spec_token": d.other_token}
        elif spec != plain:  # one stopped early: an EOS where the other went on, no margin to read
            mismatches += 1
            not_tie += 1
            entry |= {"first_difference": min(len(spec), len(plain)), "near_tie": False}
        e_plain = plain_decode(spec_m, spec_p, [ids], args.exact_tokens, eos, pad_id, True, anchors)[0][0]
        e_spec = spec_decode(spec_m, spec_p, [ids], args.exact_tokens, eos, pad_id, anchors, exact=True)[0][0]
        entry["exact_mode_equal"] = e_spec == e_plain
        exact_mismatches += e_spec != e_plain
        records.append(entry)
    print(f"  exactness: {mismatches} of {len(records)} prompts differ, {not_tie} not at a near-tie; exact mode "
          f"{exact_mismatches}", flush=True)
    return {"prompts": len(records), "mismatches": mismatches, "mismatches_not_near_tie": not_tie,
            "exact_mode_mismatches": exact_mismatches, "layout": args.exact_layout, "new_tokens": args.exact_tokens,
            "adapter": args.adapter or "random", "near_tie_ulps": args.near_tie_ulps,
            "near_tie_definition": "top-2 margin of the plain decoder's own bf16 logits at the first "
                                   "differing token <= near_tie_ulps x the bf16 spacing at the row's largest |logit| "
                                   "(2^(floor(log2|top|) - 7))", "per_prompt": records}


# ---------------------------------------------------------------- report
def table(rows: list[dict]) -> str:
    lines = ["| model | batch | method | ms/call | tokens/s | floor ms | x floor | x plain (ms) | tokens/s vs hf "
             "| vs hf compiled |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['batch']} | {r['method']} | error: {r['error'][:60]} | | | | | | |")
            continue
        same = [x for x in rows if (x["model"], x["batch"], x.get("part")) == (r["model"], r["batch"], r.get("part"))
                and "error" not in x]
        plain = next((x for x in same if x["method"] == "plain"), None)
        hf = next((x for x in same if x["method"] == "hf_generate"), None)
        hf_c = next((x for x in same if x["method"] == "hf_generate_compiled"), None)
        floor = r.get("floor_ms")
        ratio = lambda x, y: f"{x / y:.2f}" if y else ""
        cells = [f"{r['ms_per_call']:.3f}", f"{r['tokens_per_s']:.1f}", f"{floor:.3f}" if floor else "",
                 ratio(r["ms_per_call"], floor), ratio(r["ms_per_call"], plain and plain["ms_per_call"]),
                 ratio(r["tokens_per_s"], hf and hf["tokens_per_s"]),
                 ratio(r["tokens_per_s"], hf_c and hf_c["tokens_per_s"])]
        lines.append(f"| {r['model']} | {r['batch']} | {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def device_names() -> tuple[str, str]:
    """(the device, its tag in result file names)."""
    d = jax.devices()[0]
    if d.platform == "cpu":
        return f"cpu ({os.cpu_count()} cores)", "cpu"
    return d.device_kind, device_tag(d.device_kind)


def peer_device_names() -> tuple[str, str]:
    """`device_names` from torch, for the peer's process: it leaves JAX's GPU backend unstarted."""
    import torch

    if not torch.cuda.is_available():
        return f"cpu ({os.cpu_count()} cores)", "cpu"
    kind = torch.cuda.get_device_name(0)
    return kind, device_tag(kind)


def commit() -> str:
    run = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = run("status", "--porcelain", "--untracked-files=no")
    return run("rev-parse", "--short", "HEAD") + ("-dirty" if dirty else "")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(MODELS), help=f"comma-separated models of {list(MODELS)}")
    ap.add_argument("--batches", default=None, help="batch sizes for every model asked for (default: "
                                                    + "; ".join(f"{m} {b}" for m, b in DEFAULT_BATCHES.items()) + ")")
    ap.add_argument("--new_tokens", type=int, default=None, help="tokens per timed generation (default 32 at the "
                                                                 "8B shapes, 128 for SmolLM2)")
    ap.add_argument("--repeats", type=int, default=3, help="timed generations per figure (median)")
    ap.add_argument("--k", type=int, default=4, help="drafts per step of the random adapters")
    ap.add_argument("--draft_vocab", type=int, default=0,
                    help="also `spec_0_vocab`: layout 0 drafting over N token ids (with_draft_vocab; ids 0..N-1)")
    ap.add_argument("--adapter", default=None, help="SmolLM2 training run dir: real drafts for its spec rows and "
                                                    "the exactness check (default: random adapters)")
    ap.add_argument("--smollm2", default="smollm2-135m-instruct", help="SmolLM2 weights: HF dir, .gguf or alias")
    ap.add_argument("--merged", action=argparse.BooleanOptionalAction, default=None,
                    help="speculative rows in the merged decoding layout (layout.prepare: no adapter matmul, twice "
                         f"the adapted kernels' bytes; default: {MERGED_DEFAULT})")
    ap.add_argument("--no_hf", action="store_true", help="skip the transformers peer")
    ap.add_argument("--peer_only", action="store_true", help=argparse.SUPPRESS)  # the child of `peer_in_child`
    ap.add_argument("--no_exactness", action="store_true")
    ap.add_argument("--exact_prompts", type=int, default=10, help="held-out prompts per domain for exactness")
    ap.add_argument("--exact_tokens", type=int, default=256)
    ap.add_argument("--exact_layout", default="all", choices=["all", "0"])
    ap.add_argument("--near_tie_ulps", type=float, default=NEAR_TIE_ULPS)
    ap.add_argument("--distill", action="store_true", help="also distillation throughput of SmolLM2 (ours vs peer)")
    ap.add_argument("--distill_batches", default="64,256")
    ap.add_argument("--distill_tokens", type=int, default=256)
    ap.add_argument("--copy_gb", type=float, default=2.0, help="size of the array timed for the copy bandwidth")
    ap.add_argument("--budget_s", type=float, default=None, help="skip what is left once this many seconds have "
                                                                 "passed (checked before each model and batch)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/decode_<date>_<device>.json)")
    ap.add_argument("--smoke", action="store_true", help="tiny random shapes for the 8B models, batch 2, 8 new "
                                                         "tokens, one exactness prompt: the whole path on a CPU")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="only merge the reports of split runs (same device) into --out and print the table")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    only = [m for m in args.only.split(",") if m]
    unknown = set(only) - set(MODELS)
    if unknown:
        ap.error(f"--only: unknown models {sorted(unknown)}; choose from {list(MODELS)}")
    args.distill_batches = [int(b) for b in args.distill_batches.split(",")]
    if args.smoke:
        args.repeats, args.copy_gb, args.exact_prompts, args.exact_tokens = 1, 0.0625, 1, 8
        args.distill_batches, args.distill_tokens = [4], 8
    t_start = time.perf_counter()
    device, short = peer_device_names() if args.peer_only else device_names()
    tok = load_tokenizer(args.smollm2) if "smollm2-135m" in only or not args.no_exactness else None
    pad_id = (tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0)
    configs = {name: model_config(name, args.smoke, args.smollm2) for name in only}
    batches = {name: [int(b) for b in (args.batches or DEFAULT_BATCHES[name]).split(",")] for name in only}
    if args.smoke and args.batches is None:
        batches = {name: [2] for name in only}  # > 1: left padding and rows of their own
    new_tokens = {name: args.new_tokens or (8 if args.smoke else 128 if MODELS[name] is None else 32) for name in only}
    prompts_of = {name: (lambda b, name=name: prompt_ids(name, configs[name][0], b,
                                                         tok if MODELS[name] is None else None)) for name in only}
    over = lambda: args.budget_s is not None and time.perf_counter() - t_start > args.budget_s
    rows, skipped, models, distill = [], [], {}, {}
    state = {"bandwidth": None, "exactness": None}
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"decode_{datetime.date.today()}_{short}.json")

    def save(complete: bool) -> dict:
        """Write the report as it stands (`write_json`: renamed over `out`): a run cut by a time limit
        keeps every phase it finished; `complete` is false until the last."""
        report = report_of(args, argv, device, t_start, state, models, rows, distill, skipped, complete)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, report)
        return report

    if args.peer_only:  # the child process of `peer_in_child`: the peer's phase alone
        for name in only:
            if over():
                skipped.append(f"{name} hf")
                continue
            print(f"[{time.perf_counter() - t_start:.0f} s] transformers {name}", flush=True)
            rows += hf_rows(name, configs[name][1], args.smollm2, batches[name], new_tokens[name], args.repeats,
                            prompts_of[name], pad_id, over)
            if args.distill and MODELS[name] is None:
                distill |= hf_distill_rows(args, pad_id)
            save(complete=False)
        save(complete=True)
        return
    # the torch peer first, in a process of its own that ends before ours run
    if not args.no_hf:
        peer = peer_in_child(argv, args, time.perf_counter() - t_start)
        rows += peer["rows"]
        distill |= peer["distill"] or {}
        skipped += peer["skipped"]
        save(complete=False)

    bandwidth = state["bandwidth"] = copy_bandwidth(args.copy_gb)
    print(f"copy bandwidth {bandwidth / 1e12:.3f} TB/s (2 x {args.copy_gb} GiB per in-place pass)", flush=True)
    for name in only:
        if over():
            skipped.append(f"{name} jax")
            continue
        print(f"[{time.perf_counter() - t_start:.0f} s] ours {name}", flush=True)
        got, info = jax_rows(name, configs[name][0], args, batches[name], new_tokens[name], prompts_of[name], pad_id,
                             bandwidth / 1e3, over)
        rows += got
        models[name] = {**info, "new_tokens": new_tokens[name], "shapes": "smoke" if args.smoke and MODELS[name]
                        else (MODELS[name] or args.smollm2)}
        jax.clear_caches()
        gc.collect()
        save(complete=False)
    exact_report = None
    if not args.no_exactness and not over():
        print(f"[{time.perf_counter() - t_start:.0f} s] exactness", flush=True)
        exact_report = state["exactness"] = exactness(args, pad_id)
    elif not args.no_exactness:
        skipped.append("exactness")
    save(complete=False)
    # last: the batch-256 generations are the longest phase, and a cut run keeps the rest
    if args.distill and "smollm2-135m" in only and not over():
        print(f"[{time.perf_counter() - t_start:.0f} s] distillation (ours)", flush=True)
        distill["plain"] = distill_rows(args, pad_id)
    elif args.distill and "smollm2-135m" in only:
        skipped.append("distill")
    report = save(complete=True)

    print(f"\nDecoding on {device}, commit {report['commit']}, copy bandwidth {bandwidth / 1e12:.3f} TB/s\n")
    print(table(rows))
    if exact_report:
        print(f"\nexactness ({exact_report['adapter']} adapter, layout {exact_report['layout']}): "
              f"{exact_report['mismatches']} of {exact_report['prompts']} prompts differ from plain greedy, "
              f"{exact_report['mismatches_not_near_tie']} not at a near-tie; exact mode: "
              f"{exact_report['exact_mode_mismatches']}")
    for method, got in (distill or {}).items():
        print("distill " + method + ": " + ", ".join(f"batch {d['batch']} " + (f"{d['tokens_per_s']:.0f} tokens/s"
                                                                             if "tokens_per_s" in d else "failed")
                                                   for d in got))
    if skipped:
        print(f"skipped (budget): {skipped}")
    print(f"wrote {out} in {report['seconds']:.0f} s")


def peer_in_child(argv, args, elapsed: float) -> dict:
    """The peer's phase, run by this script in a child process (`--peer_only`): torch's CUDA context,
    compiled graphs and memory pool end with it, before our rows run. In one process, our SmolLM2 calls
    ran about 20% slower after the peer than without it (decode_2026-12-07_h100_lease5.md). Returns the
    child's report (rows, distill, skipped); a child that wrote none leaves a note in `skipped`."""
    import tempfile

    given = list(argv if argv is not None else sys.argv[1:])
    budget = [] if args.budget_s is None else ["--budget_s", f"{max(args.budget_s - elapsed, 1.0):.0f}"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peer.json"
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *given, "--peer_only", "--out",
                               str(out), *budget])
        if not out.exists():
            return {"rows": [], "distill": None, "skipped": [f"the peer: its process exited {proc.returncode} "
                                                             "with no report"]}
        return json.loads(out.read_text())


def report_of(args, argv, device: str, t_start: float, state: dict, models: dict, rows: list[dict], distill: dict,
              skipped: list[str], complete: bool) -> dict:
    """The JSON report of the phases run so far; each row without a floor takes its model's (the peer runs
    the same shapes)."""
    for r in rows:
        if r.get("floor_ms") is None and r["model"] in models:
            r["floor_ms"] = models[r["model"]].get("floor_ms")
    return {"device": device, "commit": commit(), "jax": jax.__version__, "date": str(datetime.date.today()),
            "command": " ".join(["benchmarks/decode.py"] + list(argv if argv is not None else sys.argv[1:])),
            "smoke": args.smoke, "dtype": "bfloat16", "copy_bandwidth_bytes_per_s": round(state["bandwidth"] or 0),
            "definitions": {
                "floor_ms": "weight bytes of the base model / copy bandwidth; copy bandwidth = 2 x bytes / median "
                            "time of an in-place integer x + 1 over a device array of copy_gb GiB (read + write)",
                "ms_per_call": "(time of a generation of new_tokens - time of a generation of 1 token) / (model "
                               "calls - 1); medians of `repeats`; every row generates exactly new_tokens (no EOS)",
                "tokens_per_s": "tokens generated after each row's first / that same time difference",
                "hf_generate": "transformers generate, bf16, cache_implementation=static, greedy, "
                               "disable_compile=True; _compiled: compile_config=CompileConfig(mode=reduce-overhead)"},
            "versions": versions(), "models": models, "rows": rows, "exactness": state["exactness"],
            "distill": distill or None, "skipped": skipped, "complete": complete,
            "seconds": round(time.perf_counter() - t_start, 1)}


def merge(paths: list[str], out: str | None) -> None:
    """One report from the reports of runs split with --only / --batches (or of several leases): rows and
    models joined, each row naming its part (an index into `parts`; "i.j" for part j of a merged report at
    index i: `table` compares rows of one part only), the first exactness and distill found; the copy
    bandwidth and commit of each part are kept."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    devices = {p["device"] for p in parts}
    if len(devices) > 1:
        raise SystemExit(f"--merge: reports from different devices {sorted(devices)}; timings do not compare")
    first = parts[0]
    report = {**first, "rows": [{**r, "part": f"{i}.{r['part']}" if "part" in r else i}
                                for i, p in enumerate(parts) for r in p["rows"]],
              "models": {k: v for p in parts for k, v in p["models"].items()},
              "exactness": next((p["exactness"] for p in parts if p.get("exactness")), None),
              "distill": next((p["distill"] for p in parts if p.get("distill")), None),
              "skipped": [s for p in parts for s in p.get("skipped", [])],
              "parts": [{"file": path, "commit": p["commit"], "command": p.get("command"), "seconds": p["seconds"],
                         "copy_bandwidth_bytes_per_s": p["copy_bandwidth_bytes_per_s"],
                         **({"parts": p["parts"]} if "parts" in p else {})}  # a merged report's own parts
                        for path, p in zip(paths, parts)],
              "commit": ",".join(dict.fromkeys(p["commit"] for p in parts))}
    target = Path(out) if out else ROOT / "benchmarks" / "results" / f"decode_{first['date']}_merged.json"
    target.write_text(json.dumps(report, indent=1))
    print(table(report["rows"]))
    print(f"wrote {target}")


def versions() -> dict:
    out = {"jax": jax.__version__}
    for mod in ("torch", "transformers", "flax"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    return out


if __name__ == "__main__":
    main()
