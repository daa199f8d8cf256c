"""Generation speed on this machine: generate.generate against Hugging Face `generate`, same weights.

    python benchmarks/generate_speed.py                        # batch 1 and 8, 128 new tokens, greedy, fp32
    python benchmarks/generate_speed.py --batches=1 --new_tokens=64 --repeats=5

A random 100m-shaped model (d_model 640, 12 layers, 10 heads, d_ff 2560, vocabulary 2,000 from a
SentencePiece model trained on the bundled text) is exported with convert.py and loaded back by
`transformers`. For each batch size, both decode --new_tokens tokens greedily after the same
prompts (every row runs to the end: no stop token), fp32, each with its KV cache. The first call
of each is "cold" (ours compiles; JAX's persistent cache is off here, so that is a real compile);
then the two alternate --repeats times and the best of each counts, so a change in the machine's
load hits both alike. Tokens/s are new tokens over all rows; CPU seconds are this process's. The
last column says whether a decoder's tokens (first call) are Hugging Face's, every row.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from absl import app, flags, logging  # noqa: E402

import checkpoint  # noqa: E402
import convert  # noqa: E402
import generate  # noqa: E402
from model import ModelConfig, Transformer, num_params  # noqa: E402
from tokenizer import BOS_ID, train_tokenizer  # noqa: E402
from tokenizer_files import open_tokenizer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
CONFIG = ModelConfig(vocab_size=2000, d_model=640, n_layers=12, n_heads=10, d_ff=2560, max_seq_len=2048,
                     dtype="float32")
PROMPTS = ["Sherlock Holmes took his bottle from the corner of the mantelpiece", "Il était une fois",
           "The train left the station", "Emma", "Madame Bovary", "It was a dark night", "Bel-Ami", "Watson"]


def define_flags() -> None:
    flags.DEFINE_list("batches", ["1", "8"], "Batch sizes (prompts decoded together).")
    flags.DEFINE_integer("new_tokens", 128, "New tokens per prompt.")
    flags.DEFINE_integer("repeats", 3, "Timed calls of each, alternating; the best counts.")
    flags.DEFINE_integer("torch_threads", 0, "torch's intra-op threads (0: its default, one per core). On a "
                         "loaded machine 2 threads on 2 cores made HF 5-10x slower than 1 thread.")
    flags.DEFINE_string("baseline", None, "Also time the generate.py and model.py (and layer_ops.py, where OLD "
                        "has one) in this folder (e.g. an older commit's: git archive OLD generate.py model.py | "
                        "tar -x -C DIR), on the same weights, side by side.")


def _measure(fn) -> tuple[float, float, list[list[int]]]:
    """(wall seconds, CPU seconds, the new tokens) of one call."""
    usage = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    start, cpu = time.perf_counter(), usage()
    out = fn()
    return time.perf_counter() - start, usage() - cpu, out


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _baseline(folder: str, model: Transformer):
    """The folder's generate module, and `model`'s weights in the folder's Transformer class."""
    ours = {name: sys.modules[name] for name in ("layer_ops", "model")}
    try:  # what the old files import: the folder's model.py, and its layer_ops.py where it has one
        if os.path.isfile(os.path.join(folder, "layer_ops.py")):
            sys.modules["layer_ops"] = _load("baseline_layer_ops", os.path.join(folder, "layer_ops.py"))
        old_model = sys.modules["model"] = _load("baseline_model", os.path.join(folder, "model.py"))
        old_generate = _load("baseline_generate", os.path.join(folder, "generate.py"))
    finally:
        sys.modules.update(ours)
    config = old_model.ModelConfig(**dataclasses.asdict(model.config))
    shapes = jax.eval_shape(lambda: old_model.Transformer(config, jax.random.key(0)))
    return old_generate, jax.tree.unflatten(jax.tree.structure(shapes), jax.tree.leaves(model))


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    checkpoint.use_compilation_cache("")
    if FLAGS.torch_threads:
        torch.set_num_threads(FLAGS.torch_threads)
    work = tempfile.mkdtemp(prefix="generate_speed_")
    texts = sorted(glob.glob(os.path.join(REPO, "samples", "*.txt")))
    tokenizer = open_tokenizer(train_tokenizer(texts, os.path.join(work, "tok"), vocab_size=CONFIG.vocab_size))
    model = Transformer(CONFIG, jax.random.key(0))
    convert.export_hf(model, tokenizer, os.path.join(work, "hf"))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(work, "hf"), dtype=torch.float32)
    print(f"model: {num_params(CONFIG):,} parameters; torch threads {torch.get_num_threads()}; "
          f"load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    n = FLAGS.new_tokens
    decoders = {"julian": (generate, model)}
    if FLAGS.baseline:
        decoders["baseline"] = _baseline(FLAGS.baseline, model)
    rows = []
    for batch in map(int, FLAGS.batches):
        prompts = [[BOS_ID, *tokenizer.encode(PROMPTS[i % len(PROMPTS)])] for i in range(batch)]
        width = max(len(p) for p in prompts)
        # Left-padded, as Hugging Face decodes a batch.
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

        def ours(module, weights):
            return lambda: module.generate(weights, prompts, n, jax.random.key(0), temperature=0.0, stop_ids=())

        def theirs():
            with torch.no_grad():
                out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                        do_sample=False, pad_token_id=0)
            return out[:, width:].tolist()

        calls = {"hf": theirs, **{name: ours(*decoder) for name, decoder in decoders.items()}}
        cold = {name: _measure(fn) for name, fn in calls.items()}
        same = {name: cold[name][2] == cold["hf"][2] for name in calls}
        best = {name: (float("inf"),) * 2 for name in calls}
        for _ in range(FLAGS.repeats):
            for name, fn in calls.items():
                wall, cpu, _ = _measure(fn)
                best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
        print(f"batch {batch}: cold {({k: v[:2] for k, v in cold.items()})}, best {best}, "
              f"load {os.getloadavg()[0]:.1f}", file=sys.stderr)
        tokens = batch * n
        for name in calls:
            rows.append((batch, name, tokens / cold[name][0], tokens / best[name][0], best[name][1] / tokens * 1000,
                         best["hf"][0] / best[name][0], best["hf"][1] / best[name][1], same[name]))

    print(f"\n| generation: {n} new tokens per row, greedy, fp32 | batch | tokens/s cold | tokens/s best | "
          "CPU ms per token | vs hf (wall) | vs hf (CPU) | HF's tokens |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for batch, name, cold, warm, cpu_ms, vs_wall, vs_cpu, same in rows:
        label = {"hf": "HF generate", "julian": "julian generate.generate"}.get(name, f"{FLAGS.baseline} (baseline)")
        print(f"| {label} | {batch} | {cold:.1f} | {warm:.1f} | {cpu_ms:.1f} | {vs_wall:.2f}x | {vs_cpu:.2f}x | "
              f"{'same' if same else 'differ'} |")


if __name__ == "__main__":
    define_flags()
    app.run(main)
