#!/usr/bin/env bash
# Manual check (not in CI: lm-eval is a heavy install): lm-evaluation-harness's local-completions
# backend through `llmcli serve` against lm-eval's own hf backend, on the same model and a small
# multiple-choice task of our own (8 contexts x 3 choices = 24 loglikelihood requests).
#
#   python3 -m venv /tmp/lmv && /tmp/lmv/bin/pip install torch==2.13.0 "lm-eval[api]==0.4.13" \
#       transformers==5.23.0 accelerate
#   bash benchmarks/lm_eval/run.sh MODEL_DIR        # from the repository root
#
# Measured on a tiny GPT-2 (2 layers, 64 wide, tokenizer trained on GPL-3): all 24 log-likelihoods
# agree to 7.6e-6 absolute (the largest is -107.0).
set -euo pipefail
model=$(realpath "$1")
lm_eval=${LM_EVAL:-/tmp/lmv/bin/lm_eval}
out=$(mktemp -d)
port=$(.venv/bin/python -c "from llmcli.distributed import free_port; print(free_port())")
export HF_HUB_OFFLINE=1
"$lm_eval" --model hf --model_args "pretrained=$model,dtype=float32" --include_path benchmarks/lm_eval \
  --tasks llmcli_tiny --device cpu --batch_size 1 --log_samples --output_path "$out/hf"
.venv/bin/llmcli serve -m "$model" --port "$port" 2> "$out/serve.log" &
server=$!
trap 'kill $server' EXIT
for _ in $(seq 1 120); do curl -sf "http://127.0.0.1:$port/health" > /dev/null && break; sleep 0.5; done
"$lm_eval" --model local-completions --model_args "model=$model,base_url=http://127.0.0.1:$port/v1/completions,\
tokenizer_backend=huggingface,tokenizer=$model,tokenized_requests=False,num_concurrent=1,max_retries=1" \
  --include_path benchmarks/lm_eval --tasks llmcli_tiny --batch_size 1 --log_samples --output_path "$out/serve"
python3 - "$out" <<'PY'
import glob, json, sys
def loglikelihoods(folder):
    [path] = glob.glob(f"{sys.argv[1]}/{folder}/*/samples_*.jsonl")
    return [float(r[0][0]) for line in open(path) for r in json.loads(line)["resps"]]
hf, served = loglikelihoods("hf"), loglikelihoods("serve")
print(f"{len(hf)} log-likelihoods; largest difference {max(abs(a - b) for a, b in zip(hf, served)):.2g}")
PY
