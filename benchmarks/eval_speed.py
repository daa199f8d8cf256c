"""Evaluation and generation speed: julian against lm-eval's `hf` backend and HF `generate`.

    python benchmarks/eval_speed.py                                   # hellaswag, bundled 40 items
    python benchmarks/eval_speed.py --tasks=hellaswag,piqa,boolq --data_dir=DIR --limit=200
    python benchmarks/eval_speed.py --tasks=french --model=tiny --new_tokens=0   # evaluate.py's French preset

A randomly initialised model of about 90M parameters (d_model 640, 12 layers, vocabulary 8,192: a
SentencePiece model trained on the bundled sample) is exported with convert.py; lm-eval runs the
same offline tasks through its `hf` backend (transformers, torch, fp32, the given batch size) and
through ours (bf16 and fp32), end to end from a loaded model (task loading, tokenization and, for
us, compilation: the "cold" column; "warm" reruns the same, with our programs compiled). Then greedy generation of
--new_tokens tokens for a batch of prompts: generate.generate (KV cache) against
`transformers` `generate` (its KV cache), fp32. `--model=tiny` times configs/tiny.flags' shape
(vocabulary 4,096) instead. Without --data_dir, tasks read samples/eval/, XWinograd-fr's real
items (samples/eval_fr/) and, for the other French tasks, records built in each task's schema
from French prose (tests/french_records.py): their timing is real, their scores mean nothing. Timings are for this machine's CPU and are
skewed by anything else running on it: check `uptime`.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

import convert  # noqa: E402
import evaluate  # noqa: E402
import generate  # noqa: E402
from model import ModelConfig, Transformer, num_params  # noqa: E402
from tokenizer import BOS_ID, Tokenizer, train_tokenizer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
def define_flags() -> None:
    flags.DEFINE_list("tasks", ["hellaswag"], "lm-eval tasks or evaluate.py presets (report, french, all) to time.")
    flags.DEFINE_string("data_dir", None, "Offline task data (evaluate.py --data_dir). Default: the bundled "
                        "samples, and --french_records records per French task that has none.")
    flags.DEFINE_integer("french_records", 40, "Default data: records built per French task without real items.")
    flags.DEFINE_enum("model", "90m", ["90m", "tiny"], "Model shape: about 90M parameters, or configs/tiny.flags'.")
    flags.DEFINE_integer("limit", None, "Items per task (default: all in data_dir).")
    flags.DEFINE_integer("batch_size", 16, "Requests per forward pass, both backends.")
    flags.DEFINE_integer("new_tokens", 128, "Generation: new tokens per prompt (0: no generation timing).")
    flags.DEFINE_integer("prompts", 4, "Generation: batch of prompts.")


CONFIGS = {"90m": ModelConfig(vocab_size=8192, d_model=640, n_layers=12, n_heads=10, d_ff=2560, max_seq_len=2048),
           "tiny": ModelConfig(vocab_size=4096, d_model=192, n_layers=4, n_heads=3, d_ff=512, max_seq_len=128)}


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _requests(output: dict) -> int:
    return sum(len(s["arguments"]) for samples in output["samples"].values() for s in samples)


def _bundled_data(directory: str, per_task: int) -> str:
    """samples/eval and samples/eval_fr, plus records in the schema of the French tasks they lack."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import french_records

    french_records.write_records(directory, per_task)
    for path in glob.glob(os.path.join(REPO, "samples", "eval*", "*.jsonl")):
        shutil.copy(path, directory)
    return directory


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    work = tempfile.mkdtemp(prefix="eval_speed_")
    texts = sorted(glob.glob(os.path.join(REPO, "samples", "*.txt")))
    config = CONFIGS[FLAGS.model]
    tokenizer = Tokenizer.load(train_tokenizer(texts, os.path.join(work, "tok"), vocab_size=config.vocab_size))
    model = Transformer(config, jax.random.key(0))
    hf_dir = os.path.join(work, "hf")
    convert.export_hf(model, tokenizer, hf_dir)
    print(f"model: {num_params(config):,} parameters; tasks {','.join(FLAGS.tasks)}; batch {FLAGS.batch_size}; "
          f"torch threads {torch.get_num_threads()}; load {os.getloadavg()[0]:.1f}", file=sys.stderr)

    data_dir = FLAGS.data_dir or _bundled_data(os.path.join(work, "data"), FLAGS.french_records)
    run = lambda lm: evaluate.evaluate_with(lm, FLAGS.tasks, data_dir, FLAGS.limit, log_samples=True)
    hf_lm = HFLM(pretrained=hf_dir, dtype="float32", batch_size=FLAGS.batch_size, device="cpu")
    hf_out, hf_cold = _timed(lambda: run(hf_lm))
    _, hf_warm = _timed(lambda: run(hf_lm))
    n = _requests(hf_out)
    rows = [("lm-eval hf backend, fp32", n / hf_cold, n / hf_warm)]
    for dtype in ("bfloat16", "float32"):
        lm = evaluate.JulianLM(model, tokenizer, batch_size=FLAGS.batch_size, dtype=dtype)
        _, cold = _timed(lambda: run(lm))
        _, warm = _timed(lambda: run(lm))
        rows.append((f"julian, {dtype}", n / cold, n / warm))

    print(f"\n| evaluation ({n} requests) | wall s cold | wall s warm | requests/s cold | requests/s warm | vs hf |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, c, w in rows:
        print(f"| {name} | {n / c:.1f} | {n / w:.1f} | {c:.1f} | {w:.1f} | "
              f"{c / rows[0][1]:.2f}x cold, {w / rows[0][2]:.2f}x warm |")
    if FLAGS.new_tokens:
        _time_generation(model, tokenizer, hf_dir)


def _time_generation(model, tokenizer, hf_dir) -> None:
    prompts = [[BOS_ID, *tokenizer.encode(p)] for p in
               ["Sherlock Holmes", "Il était une fois", "The train left the station", "Emma"][: FLAGS.prompts]]
    prompts = (prompts * FLAGS.prompts)[: FLAGS.prompts]
    tokens = FLAGS.new_tokens * len(prompts)
    fp32 = evaluate.for_inference(model, "float32")
    gen = lambda: generate.generate(fp32, prompts, FLAGS.new_tokens, jax.random.key(0), temperature=0.0, stop_ids=())
    _, cold = _timed(gen)
    _, warm = _timed(gen)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left-padded, as HF decodes
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def hf_gen():
        with torch.no_grad():
            hf_model.generate(ids, attention_mask=mask, max_new_tokens=FLAGS.new_tokens,
                              min_new_tokens=FLAGS.new_tokens, do_sample=False, pad_token_id=0)

    _, hf_cold = _timed(hf_gen)
    _, hf_warm = _timed(hf_gen)
    print(f"\n| generation ({len(prompts)} x {FLAGS.new_tokens} tokens, greedy, fp32) | tokens/s cold | "
          "tokens/s warm | vs hf (warm) |")
    print("| --- | --- | --- | --- |")
    print(f"| HF generate | {tokens / hf_cold:.1f} | {tokens / hf_warm:.1f} | 1.00x |")
    print(f"| julian generate (KV cache) | {tokens / cold:.1f} | {tokens / warm:.1f} | {hf_warm / warm:.2f}x |")


if __name__ == "__main__":
    define_flags()
    app.run(main)
