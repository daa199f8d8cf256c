#!/usr/bin/env bash
# The whole pipeline on the bundled EN/FR sample, on CPU, in a few minutes:
# tokenizer -> shards -> tiny model pretraining (with a simulated preemption) -> Hugging Face
# export -> samples -> SFT -> DPO -> one chat -> benchmark scores (lm-evaluation-harness).
set -euo pipefail
cd "$(dirname "$0")"
# XLA:CPU mallocs the step's temporaries afresh every step; by default glibc hands them back to
# the kernel and every step page-faults them in again. Keep them (see benchmarks/README.md).
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736}
out=${1:-runs/demo}
data=$(ls samples/*.txt | paste -sd, -)
mkdir -p "$out"

echo "== 1. SentencePiece BPE tokenizer (report's settings, vocab 4096 for the tiny model)"
python tokenizer.py --input="$data" --model_prefix="$out/tokenizer" --vocab_size=4096

echo "== 1b. Corpus pipeline: clean, dedup, language ID, 70/30 EN/FR mix, pack into shards"
python data.py prepare --input="$data" --output="$out/shards" --tokenizer="$out/tokenizer.model" \
  --seq_len=128 --num_shards=4 --languages=en:0.7,fr:0.3

echo "== 2. Pretrain the tiny model from the shards (configs/tiny.flags): a checkpoint and a"
echo "   held-out loss every 100 steps. A preemption is simulated with SIGTERM 10 s into training:"
echo "   the run checkpoints and exits 0, and the same command resumes where it stopped."
train=(python train.py --flagfile=configs/tiny.flags --tokenizer="$out/tokenizer.model"
       --train_data="$out/shards" --output_dir="$out/tiny" --checkpoint_every=100 --eval_every=100)
logged() { if [ -f "$out/tiny/metrics.jsonl" ]; then wc -l < "$out/tiny/metrics.jsonl"; else echo 0; fi; }
before=$(logged)
"${train[@]}" & run=$!
# Not at a fixed time: on a busy machine a run still starting up has no SIGTERM handler yet.
while kill -0 "$run" 2>/dev/null && [ "$(logged)" -le "$before" ]; do sleep 1; done
sleep 10
kill -TERM "$run" 2>/dev/null || true
wait "$run"
"${train[@]}"

echo "== 3. Export to a Hugging Face Llama folder"
python convert.py --to=hf --checkpoint="$out/tiny" --out="$out/hf"

echo "== 4. Samples"
python generate.py --checkpoint="$out/tiny" --max_new_tokens=40 --temperature=0.8 --top_k=40 \
  --prompt="Sherlock Holmes" --prompt="Il était une fois" --prompt="The"

echo "== 5. Fine-tune on the bundled EN/FR instructions (ChatML, loss on the replies only)"
sft_data=samples/sft/en_alpaca_seed_tasks.jsonl,samples/sft/fr_vigogne_oasst_part.jsonl
python sft.py --flagfile=configs/sft_tiny.flags --init_from="$out/tiny" --train_data="$sft_data" \
  --epochs=3 --output_dir="$out/sft"

echo "== 5b. Align the fine-tuned model on real human preference pairs (DPO against the frozen SFT"
echo "   model; TRL's metric names: rewards/accuracies, rewards/margins, ...)"
python dpo.py --flagfile=configs/dpo_tiny.flags --init_from="$out/sft" \
  --train_data=samples/preference/en_hh_rlhf_sample100_pairs.jsonl --output_dir="$out/dpo"

echo "== 6. Chat with the aligned model once (greedy)"
python generate.py --checkpoint="$out/dpo" --chat --temperature=0 --max_new_tokens=40 \
  --prompt="Quelle est la capitale de la France ?"

echo "== 7. Zero-shot evaluation with lm-evaluation-harness on the bundled benchmark samples (samples/eval)"
python evaluate.py --checkpoint="$out/tiny" --data_dir=samples/eval --output="$out/eval_results.json"

echo "Done: loss curve $out/tiny/loss.png, metrics $out/tiny/metrics.jsonl, HF model $out/hf, scores $out/eval_results.json, SFT run $out/sft, DPO run $out/dpo"
