#!/usr/bin/env bash
# The whole pipeline on the bundled EN/FR sample, on CPU, in a few minutes:
# tokenizer -> tiny model pretraining -> Hugging Face export -> samples -> benchmark scores.
set -euo pipefail
cd "$(dirname "$0")"
# XLA:CPU mallocs the step's temporaries afresh every step; by default glibc hands them back to
# the kernel and every step page-faults them in again. Keep them (see benchmarks/README.md).
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736}
out=${1:-runs/demo}
data=$(ls data/*.txt | paste -sd, -)
mkdir -p "$out"

echo "== 1. SentencePiece BPE tokenizer (report's settings, vocab 4096 for the tiny model)"
python tokenizer.py --input="$data" --model_prefix="$out/tokenizer" --vocab_size=4096

echo "== 2. Pretrain the tiny model (configs/tiny.flags)"
python train.py --flagfile=configs/tiny.flags --tokenizer="$out/tokenizer.model" \
  --train_data="$data" --output_dir="$out/tiny"

echo "== 3. Export to a Hugging Face Llama folder"
python convert.py --to=hf --checkpoint="$out/tiny" --out="$out/hf"

echo "== 4. Samples"
python generate.py --checkpoint="$out/tiny" --max_new_tokens=40 --temperature=0.8 --top_k=40 \
  --prompt="Sherlock Holmes" --prompt="Il était une fois" --prompt="The"

echo "== 5. Zero-shot evaluation with lm-evaluation-harness on the bundled benchmark samples (data/eval)"
python evaluate.py --checkpoint="$out/tiny" --data_dir=data/eval --output="$out/eval_results.json"

echo "Done: loss curve $out/tiny/loss.png, metrics $out/tiny/metrics.jsonl, HF model $out/hf, scores $out/eval_results.json"
