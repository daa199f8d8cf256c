#!/usr/bin/env bash
# The whole pipeline on the bundled EN/FR sample, on CPU, in a few minutes:
# tokenizer -> shards -> tiny model pretraining (with a simulated preemption) -> samples -> SFT
# -> DPO -> one chat -> benchmark scores (lm-evaluation-harness) -> Hugging Face export.
# Run again on the same directory, it reuses what is there (finished steps are not redone).
set -euo pipefail
cd "$(dirname "$0")"
# XLA:CPU mallocs the step's temporaries afresh every step; by default glibc hands them back to
# the kernel and every step page-faults them in again. Keep them (see benchmarks/README.md).
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736}
# Everything the demo needs is in the repository: nothing goes to the network.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
out=${1:-runs/demo}
data=$(ls samples/*.txt | paste -sd, -)
reused=false
if [ -d "$out/tiny" ]; then
  reused=true
  echo "== $out holds an earlier demo run: reusing it (finished steps are not redone; an interrupted"
  echo "   one resumes). To start over: rm -rf $out, or ./demo.sh ANOTHER_DIR."
fi
mkdir -p "$out"

echo "== 1. SentencePiece BPE tokenizer (report's settings, vocab 4096 for the tiny model)"
if $reused && [ -f "$out/tokenizer.model" ]; then
  echo "reusing $out/tokenizer.model (the shards and models below were made with it)"
else
  python tokenizer.py --input="$data" --model_prefix="$out/tokenizer" --vocab_size=4096
fi

echo "== 1b. Corpus pipeline: clean, dedup, language ID, 70/30 EN/FR mix, pack into shards"
python data.py prepare --input="$data" --output="$out/shards" --tokenizer="$out/tokenizer.model" \
  --seq_len=128 --num_shards=4 --languages=en:0.7,fr:0.3

train=(python train.py --flagfile=configs/tiny.flags --tokenizer="$out/tokenizer.model"
       --train_data="$out/shards" --output_dir="$out/tiny" --checkpoint_every=100 --eval_every=100)
if $reused; then
  echo "== 2. Pretrain the tiny model from the shards (configs/tiny.flags), or find it trained"
  "${train[@]}"
else
  echo "== 2. Pretrain the tiny model from the shards (configs/tiny.flags): a checkpoint and a"
  echo "   held-out loss every 100 steps. A preemption is simulated with SIGTERM 10 s into training:"
  echo "   the run checkpoints and exits 0, and the same command resumes where it stopped."
  logged() { if [ -f "$out/tiny/metrics.jsonl" ]; then wc -l < "$out/tiny/metrics.jsonl"; else echo 0; fi; }
  "${train[@]}" & run=$!
  # Not at a fixed time: on a busy machine a run still starting up has no SIGTERM handler yet.
  while kill -0 "$run" 2>/dev/null && [ "$(logged)" -le 0 ]; do sleep 1; done
  sleep 10
  kill -TERM "$run" 2>/dev/null || true
  wait "$run"
  "${train[@]}"
fi

echo "== What to expect from here: a 3.3M-parameter model (configs/tiny.flags) trained for a few"
echo "   minutes on 0.3M tokens (300 steps of 8 x 128 tokens from a 0.66M-token sample) writes"
echo "   fluent-looking nonsense, and scores near chance on the benchmarks. The same commands with"
echo "   configs/600m.flags (600M parameters, 39B tokens) on a TPU v4-32 are the recipe behind the"
echo "   report's numbers, the last column of the table at the end."

echo "== 3. Samples"
python generate.py --checkpoint="$out/tiny" --max_new_tokens=40 --temperature=0.8 --top_k=40 \
  --prompt="Sherlock Holmes" --prompt="Il était une fois" --prompt="The"

echo "== 4. Fine-tune on the bundled EN/FR instructions (ChatML, loss on the replies only)"
sft_data=samples/sft/en_alpaca_seed_tasks.jsonl,samples/sft/fr_vigogne_oasst_part.jsonl
python sft.py --flagfile=configs/sft_tiny.flags --init_from="$out/tiny" --train_data="$sft_data" \
  --epochs=3 --output_dir="$out/sft"

echo "== 5. Align the fine-tuned model on 95 real human preference pairs (DPO against the frozen SFT"
echo "   model, configs/dpo_tiny.flags; TRL's metric names). Learning shows as rewards/accuracies on"
echo "   the training pairs rising from ~0.5 to ~1 and rewards/margins growing: the model learns which"
echo "   reply people preferred in these pairs (the 5 held-out pairs are too few to say more)."
python dpo.py --flagfile=configs/dpo_tiny.flags --init_from="$out/sft" \
  --train_data=samples/preference/en_hh_rlhf_sample100_pairs.jsonl --output_dir="$out/dpo"

echo "== 6. Chat with the aligned model once (greedy)"
python generate.py --checkpoint="$out/dpo" --chat --temperature=0 --max_new_tokens=40 \
  --prompt="Quelle est la capitale de la France ?"

echo "== 7. Zero-shot evaluation of the pretrained model with lm-evaluation-harness on the bundled"
echo "   benchmark samples (samples/eval, 40 items per task), beside chance and the report"
# lm-eval's and datasets' per-task progress bars (40 items each) say nothing a user can act on.
TQDM_DISABLE=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1 \
  python evaluate.py --checkpoint="$out/tiny" --data_dir=samples/eval --output="$out/tiny/eval_results.json"

echo "== 8. Export to a Hugging Face Llama folder, with a model card that carries these scores"
python convert.py --to=hf --checkpoint="$out/tiny" --out="$out/hf"

echo "Done: loss curve $out/tiny/loss.png, metrics $out/tiny/metrics.jsonl, scores $out/tiny/eval_results.json,"
echo "SFT run $out/sft, DPO run $out/dpo, HF model $out/hf. To start over: rm -rf $out"
