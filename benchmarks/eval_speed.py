"""Evaluation speed: evaluate.py against lm-eval's `hf` backend, end to end, cold and warm.

    python benchmarks/eval_speed.py                                    # 7 report tasks, bundled 40 items each
    python benchmarks/eval_speed.py --data_dir=../shared/data/eval --skip=100 --limit=100
    python benchmarks/eval_speed.py --tasks=hellaswag,piqa --dtypes=float32
    python benchmarks/eval_speed.py --tasks=french --model=tiny           # the French preset, tiny model's shape
    python benchmarks/eval_speed.py --model=smollm2 --dtypes=float32      # a Hugging Face folder, imported

A random 100m-shaped model (d_model 640, 12 layers, 10 heads, d_ff 2560) with a 2,000-token
SentencePiece vocabulary trained on the bundled text is saved as a julian checkpoint and exported
with convert.py. `--model=smollm2` starts from the other side, as a user with an existing model
does: a random `LlamaForCausalLM` of SmolLM2-135M's shape (grouped-query attention, tied
embeddings; import_speed.py's folder) that both backends read from its Hugging Face folder, julian
importing it on the way in (`evaluate.py --checkpoint=FOLDER`). Each run is a fresh process (imports, model load, task loading, scoring), so the
figures are what a user waits for:
  * lm-eval's `hf` backend (transformers, torch, fp32), twice: "warm" is the second process;
  * julian (`evaluate.JulianLM`) per --dtypes, with an empty compilation cache ("cold"), then again
    with the cache the first run filled ("warm": programs loaded, not compiled).
Every process logs its per-item choices: the continuation of highest log-likelihood and every 0/1
metric of the item (acc, acc_norm: the length-normalized choice, lambada's greedy match); the
table counts the items where any of them differs from the `hf` backend's. Data files are
`<task>.jsonl`, or the one `<task>_*.jsonl` (the shared folder's names); --skip and --limit take
a slice of their lines.
The machine's other load skews everything: the runs are interleaved, compare rows of one table.
"""

from __future__ import annotations

import glob
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import app, flags, logging  # noqa: E402

from model import ModelConfig  # noqa: E402

FLAGS = flags.FLAGS
MODELS = {"100m": ModelConfig(vocab_size=2000, d_model=640, n_layers=12, n_heads=10, d_ff=2560, max_seq_len=2048),
          "tiny": ModelConfig(vocab_size=4096, d_model=192, n_layers=4, n_heads=3, d_ff=512, max_seq_len=128)}
CHILD = """
import json, os, sys, time
sys.path.insert(0, {repo!r})
import eval_tasks
backend, dtype, model_dir, data_dir, cache, out = sys.argv[1:7]
tasks = sys.argv[7].split(",")
if backend == "hf":  # imports no JAX
    from lm_eval.models.huggingface import HFLM
    lm = HFLM(pretrained=model_dir, dtype="float32", batch_size={batch}, device="cpu")
else:
    import checkpoint, evaluate
    checkpoint.use_compilation_cache(cache)
    lm = evaluate.JulianLM(checkpoint=model_dir, dtype=dtype, batch_size={batch})
start = time.perf_counter()
output = eval_tasks.evaluate_with(lm, tasks, data_dir, log_samples=True)
def decision(s):  # the chosen continuation (highest log-likelihood) and the item's 0/1 metrics
    first = [r[0] for r in s["resps"]]
    chosen = max(range(len(first)), key=lambda c: first[c][0]) if isinstance(first[0], (list, tuple)) else first
    return [chosen, {{m: s[m] for m in s.get("metrics", []) if s.get(m) in (0, 1)}}]
choices = {{task: [decision(s) for s in sorted(samples, key=lambda s: s["doc_id"])]
           for task, samples in output["samples"].items()}}
requests = sum(len(s["arguments"]) for samples in output["samples"].values() for s in samples)
with open(out, "w") as f:
    json.dump({{"choices": choices, "requests": requests, "scoring_s": time.perf_counter() - start}}, f)
"""


def define_flags() -> None:
    flags.DEFINE_list("tasks", ["report"], "lm-eval tasks or evaluate.py presets (report: the 7 report "
                      "tasks; french; all) to time.")
    flags.DEFINE_string("data_dir", None, "Offline task data: <task>.jsonl or <task>_*.jsonl per task. Default: "
                        "samples/eval and samples/eval_fr, plus --french_records records built in the schema of "
                        "each French task that has no bundled items (real timing, meaningless scores).")
    flags.DEFINE_integer("french_records", 40, "Default data: records per French task without bundled items.")
    flags.DEFINE_enum("model", "100m", [*MODELS, "smollm2"], "Model shape: 100m (vocabulary 2,000), configs/tiny.flags', "
                      "or smollm2: SmolLM2-135M's, a Hugging Face folder both backends read.")
    flags.DEFINE_integer("skip", 0, "Skip this many items of each task file.")
    flags.DEFINE_integer("limit", None, "Then take this many items per task (default: all).")
    flags.DEFINE_integer("batch_size", 16, "Both backends' --batch_size.")
    flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "julian dtypes to time.")
    flags.DEFINE_string("baseline_repo", None, "Also time julian (fp32) from this checkout, e.g. a worktree "
                        "of an older commit, to measure a change side by side.")


def _slice_data(tasks, data_dir, skip, limit, out_dir) -> None:
    for task in tasks:
        found = [os.path.join(data_dir, f"{task}.jsonl")]
        if not os.path.isfile(found[0]):
            found = sorted(glob.glob(os.path.join(data_dir, f"{task}_*.jsonl")))
        if len(found) != 1:
            raise FileNotFoundError(f"--data_dir {data_dir!r}: expected {task}.jsonl or one {task}_*.jsonl")
        with open(found[0]) as f:
            lines = f.readlines()[skip:]
        with open(os.path.join(out_dir, f"{task}.jsonl"), "w") as f:
            f.writelines(lines[:limit])


def _bundled_data(directory: str, per_task: int) -> str:
    """samples/eval and samples/eval_fr, plus records in the schema of the French tasks they lack."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import french_records

    french_records.write_records(directory, per_task)
    for path in glob.glob(os.path.join(REPO, "samples", "eval*", "*.jsonl")):
        shutil.copy(path, directory)
    return directory


def _model(work: str, config) -> tuple[str, str, int]:
    """(julian checkpoint, HF folder, parameter count) of a random model of `config`'s shape."""
    import jax

    import checkpoint
    import convert
    from model import Transformer, num_params
    from tokenizer import train_tokenizer
    from tokenizer_files import open_tokenizer

    texts = sorted(glob.glob(os.path.join(REPO, "samples", "*.txt")))
    tokenizer = open_tokenizer(train_tokenizer(texts, os.path.join(work, "tok"), vocab_size=config.vocab_size))
    model = Transformer(config, jax.random.key(0))
    checkpoint.save(os.path.join(work, "julian"), 0, model, tokenizer.model_bytes)
    convert.export_hf(model, tokenizer, os.path.join(work, "hf"))
    return os.path.join(work, "julian"), os.path.join(work, "hf"), num_params(config)


def _run(backend, dtype, model_dir, data_dir, cache, work, name, repo=REPO) -> dict:
    out = os.path.join(work, f"{name}.json")
    script = CHILD.format(repo=repo, batch=FLAGS.batch_size)
    start, cpu = time.perf_counter(), _children_cpu()
    subprocess.run([sys.executable, "-c", script, backend, dtype, model_dir, data_dir, cache, out,
                    ",".join(FLAGS.tasks)], check=True, stdout=subprocess.DEVNULL)
    seconds, cpu = time.perf_counter() - start, _children_cpu() - cpu
    with open(out) as f:
        result = json.load(f)
    print(f"{name}: {seconds:.1f} s (scoring {result['scoring_s']:.1f} s), {cpu:.1f} CPU s, load "
          f"{os.getloadavg()[0]:.1f}", file=sys.stderr)
    return {**result, "seconds": seconds, "cpu": cpu}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(work: str) -> None:
    from eval_tasks import expand_tasks

    tasks = expand_tasks(FLAGS.tasks)
    data_dir = os.path.join(work, "data")
    os.makedirs(data_dir)
    source = FLAGS.data_dir or _bundled_data(os.path.join(work, "bundled"), FLAGS.french_records)
    _slice_data(tasks, source, FLAGS.skip, FLAGS.limit, data_dir)
    if FLAGS.model == "smollm2":
        from import_speed import make_folder

        julian_dir = hf_dir = os.path.join(work, "hf")
        n_params = make_folder(hf_dir)
        with open(os.path.join(hf_dir, "config.json")) as f:
            vocab_size = f"{json.load(f)['vocab_size']:,}"
    else:
        julian_dir, hf_dir, n_params = _model(work, MODELS[FLAGS.model])
        vocab_size = f"{MODELS[FLAGS.model].vocab_size:,}"
    print(f"model: {n_params:,} parameters, vocab {vocab_size}; tasks {','.join(tasks)}; items {FLAGS.skip + 1}-"
          f"{'' if FLAGS.limit is None else FLAGS.skip + FLAGS.limit}; batch {FLAGS.batch_size}; "
          f"load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    variants = [(f"julian, {dtype}", REPO, dtype) for dtype in FLAGS.dtypes]
    if FLAGS.baseline_repo:
        variants.append((f"julian at {os.path.basename(os.path.abspath(FLAGS.baseline_repo))}, float32",
                         os.path.abspath(FLAGS.baseline_repo), "float32"))
    # Interleaved: a change in the machine's load hits every row alike.
    runs = {}
    for when in ("cold", "warm"):
        runs[f"hf {when}"] = _run("hf", "float32", hf_dir, data_dir, "", work, f"hf_{when}")
        for v, (label, repo, dtype) in enumerate(variants):
            runs[f"{label} {when}"] = _run("julian", dtype, julian_dir, data_dir, os.path.join(work, f"cache{v}"),
                                           work, f"{v}_{when}", repo)

    n = runs["hf cold"]["requests"]
    reference = runs["hf cold"]["choices"]
    items = sum(len(c) for c in reference.values())
    print(f"\n| evaluation: {len(tasks)} tasks, {items} items, {n} requests, end to end | seconds cold / "
          "warm | CPU seconds cold / warm | vs hf: seconds cold / warm | vs hf: CPU seconds cold / warm | "
          "items choosing otherwise than hf |")
    print("| --- | --- | --- | --- | --- | --- |")
    hf_cold, hf_warm = runs["hf cold"], runs["hf warm"]
    print(f"| lm-eval hf backend, fp32 | {hf_cold['seconds']:.1f} / {hf_warm['seconds']:.1f} | {hf_cold['cpu']:.1f} / "
          f"{hf_warm['cpu']:.1f} | 1.00x / 1.00x | 1.00x / 1.00x | |")
    for label, _, _ in variants:
        cold, warm = runs[f"{label} cold"], runs[f"{label} warm"]
        differ = sum(a != b for task in reference for a, b in zip(reference[task], cold["choices"][task]))
        print(f"| {label} | {cold['seconds']:.1f} / {warm['seconds']:.1f} | {cold['cpu']:.1f} / {warm['cpu']:.1f} | "
              f"{hf_cold['seconds'] / cold['seconds']:.2f}x / {hf_warm['seconds'] / warm['seconds']:.2f}x | "
              f"{hf_cold['cpu'] / cold['cpu']:.2f}x / {hf_warm['cpu'] / warm['cpu']:.2f}x | {differ} |")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    work = tempfile.mkdtemp(prefix="eval_speed_")
    try:
        measure(work)
    finally:  # two checkpoints of the model and the compilation caches: ~600 MB at 100m
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    define_flags()
    app.run(main)
