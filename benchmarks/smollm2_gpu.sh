#!/usr/bin/env bash
# SmolLM2-135M-Instruct, k = 4, on one GPU: self-distilled data, training, speculative decoding.
#   bash benchmarks/smollm2_gpu.sh [MODEL] [WORK_DIR] [MAX_STEPS] [STAGES]
# MODEL: HF dir, .gguf or alias (default smollm2-135m-instruct); WORK_DIR holds the data and the run
# (default runs/smollm2_gpu); STAGES: any of data,train,bench,decode,serve (default data,train,bench;
# decode: benchmarks/decode.py's SmolLM2 rows, peer, exactness and distill; serve: benchmarks/serve.py,
# speculative against plain). Env: DISTILL_BATCH (default 1024, about 18 GB of KV cache) rows per
# generation batch, CODE_PROMPTS (default 12000) code tasks, MATH_PROMPTS (default 3000) math problems,
# OUT_DIR (default benchmarks/results) the reports. Every stage resumes: distill appends to its JSONL,
# train takes --resume, so a rerun continues a cut run.
set -euo pipefail
model=${1:-smollm2-135m-instruct}
work=${2:-runs/smollm2_gpu}
steps=${3:-3000}
stages=${4:-data,train,bench}
prompts=mtp_jax/data/prompts
mkdir -p "$work"

if [[ $stages == *data* ]]; then
  # 1) code tasks made from the documented functions of the standard library and the installed
  #    packages (CODE_PROMPTS of them, default 12000), greedy answers
  [[ -f $work/code_prompts.jsonl ]] || python benchmarks/code_prompts.py --out "$work/code_prompts.jsonl" \
    --limit "${CODE_PROMPTS:-12000}" --src "$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')" \
    "$(python -c 'import site; print(site.getsitepackages()[0])')"
  python -m mtp_jax.data.distill --model "$model" --prompts "$work/code_prompts.jsonl" --out "$work/code.jsonl" \
    --max_new_tokens 256 --batch_size ${DISTILL_BATCH:-1024} --dtype bfloat16
  # 2) math exercises and word problems from seeded templates (MATH_PROMPTS of them, default 3000), greedy
  [[ -f $work/math_prompts.jsonl ]] || python benchmarks/math_prompts.py --out "$work/math_prompts.jsonl" \
    --limit "${MATH_PROMPTS:-3000}"
  python -m mtp_jax.data.distill --model "$model" --prompts "$work/math_prompts.jsonl" --out "$work/math.jsonl" \
    --max_new_tokens 256 --batch_size ${DISTILL_BATCH:-1024} --dtype bfloat16
  # 3) the shipped training prompts (code and math) and 4) general chat requests on topics no held-out
  #    prompt names (benchmarks/chat_prompts.py): greedy, and 3 sampled answers each (temperature 0.7)
  [[ -f $work/chat_prompts.jsonl ]] || python benchmarks/chat_prompts.py --out "$work/chat_prompts.jsonl"
  for spec in train:$prompts/train_prompts.jsonl chat:$work/chat_prompts.jsonl; do
    name=${spec%%:*} file=${spec#*:}
    python -m mtp_jax.data.distill --model "$model" --prompts "$file" --out "$work/${name}_greedy.jsonl" \
      --max_new_tokens 256 --batch_size ${DISTILL_BATCH:-1024} --dtype bfloat16
    python - "$file" "$work/${name}_x3_prompts.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
with open(sys.argv[2], "w") as f:
    for s in range(3):
        for r in rows:
            f.write(json.dumps({**r, "id": f"{r['id']}-s{s}"}) + "\n")
PY
    python -m mtp_jax.data.distill --model "$model" --prompts "$work/${name}_x3_prompts.jsonl" \
      --out "$work/${name}_sampled.jsonl" --max_new_tokens 256 --batch_size ${DISTILL_BATCH:-1024} --dtype bfloat16 \
      --temperature 0.7 --top_p 0.95
  done
  cat "$work"/{code,math,train_greedy,train_sampled,chat_greedy,chat_sampled}.jsonl > "$work/train.jsonl.tmp"
  mv "$work/train.jsonl.tmp" "$work/train.jsonl"
  wc -l "$work/train.jsonl"
fi

if [[ $stages == *train* ]]; then
  python -m mtp_jax.train --config configs/smollm2_k4_gpu.yaml --model.path "$model" \
    --data.train_file "$work/train.jsonl" --train.save_dir "$work/run" --train.max_steps "$steps" --resume
fi

if [[ $stages == *bench* ]]; then
  python benchmarks/speculative.py --adapter "$work/run" --dtype bfloat16 --per_domain 30 --max_new_tokens 256 \
    --batch_sizes 1,8 --out_dir "${OUT_DIR:-benchmarks/results}"
fi

if [[ $stages == *decode* ]]; then
  python benchmarks/decode.py --only smollm2-135m --smollm2 "$model" --adapter "$work/run" --distill \
    --out "${OUT_DIR:-benchmarks/results}/decode_smollm2.json"
fi

if [[ $stages == *serve* ]]; then
  python benchmarks/serve.py --adapter "$work/run" --dtype bfloat16 --out "${OUT_DIR:-benchmarks/results}/serve.md"
fi
