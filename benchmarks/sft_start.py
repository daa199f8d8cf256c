"""The start of a resumed fine-tuning run, with its rows prepared again or read from the cache.

    python benchmarks/sft_start.py                        # 30,000 conversations, rows of 1,024
    python benchmarks/sft_start.py --conversations=50000 --workers=1,2,4

The corpus is the bundled samples/sft files copied over and over (with a counter in each user
message, so no two records are equal) into one JSONL file. First, rendering alone
(`prepared.Renderer`, its pool started beforehand) with 1, 2, ... processes: wall time, and the
CPU time of all rendering processes together (equal CPU times mean no overhead: a shorter wall
time needs idle cores). Then `sft.prepare` (load, render, hold out, mix, pack) in full, and
reading its rows back from the cache. Then `sft.py` itself on a tiny model: a run of 1 step (which prepares the
rows and caches them), then that run resumed for one more step, timed from the process's start to
its first training step (the "resume" event in metrics.jsonl, written just before it):
  before  --noreuse_prepared --prepare_workers=1: what every start did before the cache;
  parallel --noreuse_prepared: rendering over all cores, without the cache;
  after   the cache hit.
Each resumed run starts from its own copy of the 1-step run.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

import chat_data  # noqa: E402
import chat_formats  # noqa: E402
import prepared  # noqa: E402
import sft  # noqa: E402
from tokenizer import train_tokenizer  # noqa: E402
from tokenizer_files import open_tokenizer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_integer("conversations", 30_000, "Records in the corpus (the samples, repeated).")
flags.DEFINE_integer("seq_len", 1024, "Tokens per packed row.")
flags.DEFINE_string("workers", "1,2", "Rendering processes to time sft.prepare with.")
flags.DEFINE_bool("runs", True, "Also time sft.py's resumed starts.")
FLAGS = flags.FLAGS


def write_corpus(path: str, count: int) -> None:
    sample = os.path.join(REPO, "samples", "sft")
    lines = [line for name in sorted(os.listdir(sample)) if name.endswith(".jsonl")
             for line in open(os.path.join(sample, name), encoding="utf-8") if line.strip()]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(count):
            record = json.loads(lines[i % len(lines)])
            for key in ("instruction", "conversation"):  # the samples' two shapes
                if key == "instruction" and key in record:
                    record[key] = f"({i}) {record[key]}"
                elif key in record:
                    record[key][0]["content"] = f"({i}) {record[key][0]['content']}"
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def resumed_start(base: str, out: str, args: list[str]) -> tuple[float, float]:
    """(seconds from the start of a resumed sft.py to its first step, seconds to its exit)."""
    shutil.copytree(base, out)
    started = time.time()
    subprocess.run([sys.executable, os.path.join(REPO, "sft.py"), *args, f"--output_dir={out}", "--steps=2"],
                   cwd=REPO, check=True, capture_output=True, text=True)
    ended = time.time()
    with open(os.path.join(out, "metrics.jsonl")) as f:
        resume = [r for r in map(json.loads, f) if r.get("event") == "resume"][-1]
    return resume["time"] - started, ended - started


def main(argv):
    del argv
    rows = []
    with tempfile.TemporaryDirectory(prefix="sft-start-") as tmp:
        corpus = os.path.join(tmp, "chats.jsonl")
        write_corpus(corpus, FLAGS.conversations)
        tokenizer_path = train_tokenizer(sorted(os.path.join(REPO, "samples", n) for n in os.listdir(
            os.path.join(REPO, "samples")) if n.endswith(".txt")), os.path.join(tmp, "tok"), vocab_size=4096)
        tokenizer = open_tokenizer(tokenizer_path)
        config = sft.DataConfig((corpus,), FLAGS.seq_len, validation_fraction=0.02)
        records, _ = chat_formats.load_conversations(corpus)
        render_one = functools.partial(chat_data.render, max_tokens=FLAGS.seq_len + 1)
        for workers in (int(w) for w in FLAGS.workers.split(",")):
            with prepared.Renderer(tokenizer, workers) as renderer:
                renderer.render(render_one, records[: 4 * prepared.CHUNK])  # start the pool: not timed
                renderer.cpu_seconds, started = 0.0, time.perf_counter()
                renderer.render(render_one, records)
                seconds = time.perf_counter() - started
            rows.append((f"render, {workers} process{'es' * (workers > 1)}", seconds, renderer.cpu_seconds,
                         len(records) / seconds))
        for workers in (int(w) for w in FLAGS.workers.split(",")):
            started = time.perf_counter()
            packed, _, stats = sft.prepare(config, tokenizer, workers)
            seconds = time.perf_counter() - started
            rows.append((f"sft.prepare (load, render, mix, pack), {workers} process{'es' * (workers > 1)}",
                         seconds, None, stats[0].conversations / seconds))
        cache = prepared.Cache(os.path.join(tmp, "prepared"), log=lambda _: None)
        sft.prepare(config, tokenizer, cache=cache)
        started = time.perf_counter()
        sft.prepare(config, tokenizer, cache=cache)
        seconds = time.perf_counter() - started
        rows.append(("sft.prepare, cache hit", seconds, None, stats[0].conversations / seconds))
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache.directory) for f in fs)

        runs = []
        if FLAGS.runs:
            args = ["--flagfile=configs/sft_tiny.flags", "--vocab_size=4096", "--d_model=32", "--n_layers=1",
                    "--n_heads=1", "--d_ff=64", f"--seq_len={FLAGS.seq_len}", f"--tokenizer={tokenizer_path}",
                    f"--train_data={corpus}", "--warmup_steps=0", "--eval_every=0", "--checkpoint_every=1",
                    "--batch_size=2"]
            base = os.path.join(tmp, "base")
            subprocess.run([sys.executable, os.path.join(REPO, "sft.py"), *args, f"--output_dir={base}",
                            "--steps=1"], cwd=REPO, check=True, capture_output=True, text=True)
            for name, extra in (("before: prepared again, 1 process", ["--noreuse_prepared", "--prepare_workers=1"]),
                                ("prepared again, all cores", ["--noreuse_prepared"]),
                                ("after: cache hit", [])):
                runs.append((name, *resumed_start(base, os.path.join(tmp, name.split(":")[0].replace(" ", "_")
                                                                      .replace(",", "")), args + extra)))

    print(f"{stats[0].conversations:,} conversations, {packed.num_rows:,} rows of {FLAGS.seq_len + 1:,} tokens, "
          f"cache entry {size / 2**20:.1f} MiB; {os.cpu_count()} cores, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    print("| what | wall s | CPU s, all processes | conversations/s |\n| --- | --- | --- | --- |")
    for name, seconds, cpu, rate in rows:
        print(f"| {name} | {seconds:.2f} | {'' if cpu is None else f'{cpu:.2f}'} | {rate:,.0f} |")
    if runs:
        print("\n| resumed sft.py run | start to first step (s) | whole run of 1 step (s) |\n| --- | --- | --- |")
        for name, first, whole in runs:
            print(f"| {name} | {first:.1f} | {whole:.1f} |")


if __name__ == "__main__":
    app.run(main)
