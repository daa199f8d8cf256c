"""The corpus pipeline (data.py prepare on Ray): stage costs per core, end to end against them,
memory at 1x and 4x, dedup quality on planted duplicates; then the stream over the shards.

    python benchmarks/data_prep.py                       # 1x = 10 MB (~10 min on 2 busy cores)
    python benchmarks/data_prep.py --mb=2 --stream_steps=0

1) A planted corpus (`planted_corpus`): documents of 20-40 random sentences of the bundled EN/FR
   novels (distinct documents share almost no word 5-gram), plus near duplicates (one word in
   80 changed: Jaccard ~0.88), hard negatives (one word in 12 changed: Jaccard ~0.5, must be
   kept) and exact copies, shuffled over --files JSONL files so duplicates cross files.
2) Stages alone, one process, on the first --stage_mb: read, clean, shingle + MinHash (rensa, and
   datasketch for comparison), language ID, tokenize: MB/s per core. Their inverse sum bounds
   what one core can do end to end.
3) prepare end to end on the 1x corpus with 1 CPU, 2 CPUs (a local Ray started by the command),
   and a 2-node cluster (`ray start` on 127.0.0.1, one CPU each), and on the 4x corpus with 2
   CPUs: wall time, MB/s per core against the bound, peak RSS of the driver and of the largest
   task (psutil, sampled every 50 ms), dedup precision and recall against the planted truth.
4) The stream: one host's slice (process 0 of 4) of a global batch of 64 x 2049 tokens, from
   local disk (tokens/s), against what one of a v4-32's 4 hosts consumes.
Other processes on the same cores skew everything: check `uptime` first.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import documents  # noqa: E402
import stages  # noqa: E402
import storage  # noqa: E402
import stream  # noqa: E402
from tokenizer import Tokenizer, train_tokenizer  # noqa: E402

V4_32_TOKENS_PER_STEP = 1024 * 2048
STEP_SECONDS = 6 * 599_906_560 * V4_32_TOKENS_PER_STEP / (0.38 * 16 * 275e12)  # 38% MFU, 600M
HOSTS = 4
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def _sentences(language: str) -> list[str]:
    out = []
    for name in sorted(os.listdir(os.path.join(ROOT, "samples"))):
        if name.startswith(language + "_") and name.endswith(".txt"):
            for doc in documents.iter_documents(os.path.join(ROOT, "samples", name)):
                out += [s for s in _SENTENCE.split(doc.text.replace("\n", " ")) if len(s.split()) >= 6]
    return out


def _changed(text: str, every: int, rng: np.random.Generator) -> str:
    words = text.split(" ")
    for i in rng.choice(len(words), max(1, len(words) // every), replace=False):
        words[i] = f"x{rng.integers(1 << 30)}"
    return " ".join(words)


def jaccard(a: str, b: str) -> float:
    x, y = set(documents.shingles(a)), set(documents.shingles(b))
    return len(x & y) / len(x | y)


def planted_corpus(directory: str, distinct: int, files: int, seed: int = 0) -> tuple[list[str], dict]:
    """JSONL files of `distinct` documents (70% EN, 30% FR) plus planted duplicates; returns the
    paths and the truth: per document (file, record, group), documents of a group being copies."""
    rng = np.random.default_rng(seed)
    pools = {"en": _sentences("en"), "fr": _sentences("fr")}
    docs = []  # (text, lang, group)
    exact = 0
    for group in range(distinct):
        lang = "en" if rng.random() < 0.7 else "fr"
        pool = pools[lang]
        text = " ".join(pool[i] for i in rng.integers(0, len(pool), rng.integers(20, 41)))
        docs.append((text, lang, group))
        kind = rng.random()
        if kind < 0.25:  # near duplicates, one or two
            for _ in range(rng.integers(1, 3)):
                docs.append((_changed(text, 80, rng), lang, group))
        elif kind < 0.35:  # a hard negative: similar, not a near duplicate
            docs.append((_changed(text, 12, rng), lang, distinct + group))
        if rng.random() < 0.05:
            docs.append((text, lang, group))
            exact += 1
    order = rng.permutation(len(docs))
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, f"part-{f:04d}.jsonl") for f in range(files)]
    truth = []
    handles = [open(p, "w", encoding="utf-8") for p in paths]
    counts = [0] * files
    for i, doc_index in enumerate(order):
        text, lang, group = docs[doc_index]
        f = i % files
        handles[f].write(json.dumps({"text": text, "lang": lang}, ensure_ascii=False) + "\n")
        truth.append((f, counts[f], int(group)))
        counts[f] += 1
    for h in handles:
        h.close()
    return paths, {"docs": truth, "exact_copies": exact}


def dedup_quality(config: stages.PrepareConfig, truth: dict) -> dict:
    """Precision and recall of the removed documents against the planted groups, read from the
    run's stage files: a group of n documents should lose exactly n - 1."""
    removed = set()
    splits = json.loads(storage.read_bytes(stages.stage(config, data.SPLITS_FILE)))
    records_before: dict = {}  # per file: records of its earlier splits
    for i, split in enumerate(splits):
        meta = stages.load_meta(config, i)
        rows = stages.load_npz(stages.stage(config, f"removed-{i:05d}.npz"))["removed"]
        first = records_before.get(split["file"], 0)
        removed |= {(split["file"], first + int(r)) for r in meta["record"][rows]}
        records_before[split["file"]] = first + meta["summary"]["read"] + meta["summary"]["bad"]
    groups: dict = {}
    for f, record, group in truth["docs"]:
        groups.setdefault(group, []).append((f, record))
    true_positives = distinct_removed = cross_file = 0
    should = sum(len(m) - 1 for m in groups.values())
    for members in groups.values():
        lost = sum(m in removed for m in members)
        if len(members) == 1:
            distinct_removed += lost
        else:
            true_positives += min(lost, len(members) - 1)
            cross_file += lost > 0 and len({f for f, _ in members}) > 1
    return {"precision": true_positives / max(1, len(removed)), "recall": true_positives / max(1, should),
            "removed": len(removed), "planted": should, "distinct_removed": distinct_removed,
            "cross_file_pairs_found": cross_file}


def time_stages(paths: list[str], tokenizer: Tokenizer, megabytes: float) -> dict:
    """Seconds per MB of each stage alone, in this process."""
    started = time.perf_counter()
    texts, size = [], 0
    for path in paths:
        for doc in documents.iter_documents(path):
            texts.append(doc.text)
            size += len(doc.text.encode())
            if size >= megabytes * 1e6:
                break
        if size >= megabytes * 1e6:
            break
    mb = size / 1e6
    cost = {"read": (time.perf_counter() - started) / mb}
    documents.detect_language("warm up: load the model")

    def timed(name, fn):
        started = time.perf_counter()
        out = [fn(t) for t in texts]
        cost[name] = (time.perf_counter() - started) / mb
        return out

    cleaned = timed("clean", lambda t: (documents.clean_text(t), documents.alnum_share(t)))
    texts = [c for c, _ in cleaned]
    timed("minhash (rensa)", lambda t: documents.minhash(t, 128))
    from datasketch import MinHash

    template = MinHash(num_perm=128, seed=1)

    def datasketch_minhash(text):  # the path data.py took before rensa: a set of bytes shingles
        m = MinHash(num_perm=128, seed=1, permutations=template.permutations, scheme=template.scheme)
        grams = [g.encode() for g in set(documents.shingles(text))]
        for i in range(0, len(grams), 1024):
            m.update_batch(grams[i:i + 1024])
        return m

    timed("minhash (datasketch)", datasketch_minhash)
    timed("language ID", documents.detect_language)
    timed("tokenize", tokenizer.encode)
    return cost


def _tree(pid: int) -> list:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def run_prepare(args: list[str], roots: list[int]) -> dict:
    """`python data.py prepare ARGS` in a subprocess; peak RSS of the driver and of any process
    running a task (processes under the driver and under `roots`, sampled every 50 ms)."""
    import psutil

    driver = subprocess.Popen([sys.executable, os.path.join(ROOT, "data.py"), "prepare", *args], cwd=ROOT,
                              env=dict(os.environ, RAY_AUTH_MODE="token"), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    peak_driver = peak_task = 0
    task = ""
    started = time.perf_counter()
    while driver.poll() is None:
        try:
            peak_driver = max(peak_driver, psutil.Process(driver.pid).memory_info().rss)
        except psutil.Error:
            pass
        for process in [p for r in [driver.pid, *roots] for p in _tree(r)]:
            try:
                title = (process.cmdline() or [""])[0]
                if title.startswith("ray::") and not title.startswith(("ray::IDLE", "ray::RuntimeEnv")):
                    rss = process.memory_info().rss
                    if rss > peak_task:
                        peak_task, task = rss, title.split()[0]
            except psutil.Error:
                continue
        time.sleep(0.05)
    output = driver.stdout.read()
    if driver.returncode:
        raise RuntimeError(f"prepare failed:\n{output}")
    return {"seconds": time.perf_counter() - started, "driver_rss": peak_driver, "task_rss": peak_task,
            "task": task, "output": output}


def start_cluster() -> tuple[str, list[subprocess.Popen]]:
    """A head and a second node, one CPU each, on 127.0.0.1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RAY_AUTH_MODE="token")
    common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    head = subprocess.Popen(["ray", "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while subprocess.run(["ray", "status", f"--address=127.0.0.1:{port}"], env=env,
                         capture_output=True).returncode:
        time.sleep(1)
    node = subprocess.Popen(["ray", "start", f"--address=127.0.0.1:{port}", *common], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while subprocess.run(["ray", "status", f"--address=127.0.0.1:{port}"], env=env, capture_output=True,
                         text=True).stdout.count("node_") < 2:
        time.sleep(1)
    return f"127.0.0.1:{port}", [head, node]


def time_stream(spec: str, tokenizer: Tokenizer, steps: int) -> float:
    """tokens/s read by process 0 of HOSTS."""
    s = stream.open_train_data(spec, tokenizer=tokenizer, seq_len=2048, seed=0, global_batch_size=64,
                               process_index=0, process_count=HOSTS)
    s.batch(0)
    started = time.perf_counter()
    for step in range(1, steps + 1):
        batch = s.batch(step)
    return batch.size * steps / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=10, help="size of the 1x corpus in MB")
    parser.add_argument("--stage_mb", type=float, default=3, help="MB timed per stage (one process)")
    parser.add_argument("--files", type=int, default=8, help="JSONL files of the 1x corpus (4x: 4 times more)")
    parser.add_argument("--stream_steps", type=int, default=50)
    parser.add_argument("--split_mb", type=float, default=64, help="prepare's --split_mb (byte ranges of a file)")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}", file=sys.stderr)
    tmp = tempfile.mkdtemp(prefix="data_prep_bench_")
    try:
        run(args, tmp)
    finally:
        shutil.rmtree(tmp)


def run(args, tmp: str) -> None:
    samples = sorted(os.path.join(ROOT, "samples", f) for f in os.listdir(os.path.join(ROOT, "samples"))
                     if f.endswith(".txt"))
    tokenizer_path = train_tokenizer(samples, os.path.join(tmp, "tok"), vocab_size=4096)
    tokenizer = Tokenizer.load(tokenizer_path)
    per_doc = 2_200  # bytes of an average planted document, measured
    corpora = {}
    for scale in (1, 4):
        distinct = int(args.mb * 1e6 * scale / per_doc / 1.4)
        corpora[scale] = planted_corpus(os.path.join(tmp, f"corpus{scale}x"), distinct, args.files * scale)
        size = sum(os.path.getsize(p) for p in corpora[scale][0]) / 1e6
        print(f"corpus {scale}x: {size:.1f} MB, {len(corpora[scale][1]['docs']):,} documents", file=sys.stderr)
    cost = time_stages(corpora[1][0], tokenizer, args.stage_mb)
    pipeline = ("read", "clean", "minhash (rensa)", "language ID", "tokenize")
    bound = 1 / sum(cost[k] for k in pipeline)

    common = [f"--tokenizer={tokenizer_path}", "--seq_len=2048", "--num_shards=8", "--languages=en:0.7,fr:0.3",
              f"--split_mb={args.split_mb}"]
    runs = []
    address, nodes = None, []
    for name, scale, cpus, extra in [("1x, 1 CPU", 1, 1, ["--num_cpus=1"]), ("1x, 2 CPUs", 1, 2, ["--num_cpus=2"]),
                                     ("1x, 2 nodes x 1 CPU", 1, 2, None), ("4x, 2 CPUs", 4, 2, ["--num_cpus=2"])]:
        print(f"prepare {name}...", file=sys.stderr)
        if extra is None:
            address, nodes = start_cluster()
            extra = [f"--ray_address={address}"]
        out = os.path.join(tmp, f"out-{len(runs)}")
        paths, truth = corpora[scale]
        try:
            result = run_prepare(["--input=" + ",".join(paths), f"--output={out}", *common, *extra],
                                 [n.pid for n in nodes])
        finally:
            for node in nodes:
                node.send_signal(signal.SIGTERM)
            for node in nodes:
                node.wait()
            nodes = []
        manifest = json.load(open(os.path.join(out, "manifest.json")))
        config = data.PrepareConfig(inputs=tuple(paths), output=out, tokenizer=tokenizer_path)
        runs.append((name, cpus, manifest, result, dedup_quality(config, truth)))

    print(f"\nload average after: {os.getloadavg()[0]:.2f} (2 cores shared with other processes)")
    print("\nstages alone, one process, on the 1x corpus:")
    print(f"{'stage':<24}{'MB/s per core':>14}")
    for name, seconds_per_mb in cost.items():
        print(f"{name:<24}{1 / seconds_per_mb:>14.2f}")
    print(f"{'bound (inverse sum)':<24}{bound:>14.2f}   MinHash rensa vs datasketch: "
          f"{cost['minhash (datasketch)'] / cost['minhash (rensa)']:.1f}x per core")
    print("\nprepare end to end (wall s: the command, with starting Ray; stages s: its stages; MB/s per core\n"
          "of the stages; of bound: of 1 / (the map stages' seconds per MB alone + this run's own dedup,\n"
          "components and pack task seconds per MB)):")
    header = (f"{'run':<22}{'MB':>7}{'wall s':>8}{'stages s':>9}{'MB/s/core':>10}{'of bound':>9}{'driver MB':>10}"
              f"{'task MB':>9}{'precision':>10}{'recall':>8}")
    print(header + "\n" + "-" * len(header))
    for name, cpus, manifest, result, quality in runs:
        mb = manifest["input_bytes"] / 1e6
        stages_seconds = sum(manifest["stage_wall_seconds"].values())  # without starting Ray
        rate = mb / stages_seconds / cpus
        # The bound of this run: the map stages' costs measured alone, plus the CPU seconds its
        # dedup, components and pack tasks measured themselves.
        after_map = sum(manifest["stage_cpu_seconds"].get(k, 0) for k in ("dedup", "components", "pack"))
        run_bound = mb / (mb / bound + after_map)
        print(f"{name:<22}{mb:>7.1f}{result['seconds']:>8.1f}{stages_seconds:>9.1f}{rate:>10.2f}{rate / run_bound:>9.0%}"
              f"{result['driver_rss'] / 2**20:>10.0f}{result['task_rss'] / 2**20:>9.0f}"
              f"{quality['precision']:>10.3f}{quality['recall']:>8.3f}")
    for name, _, manifest, result, quality in runs:
        print(f"{name}: stage wall s {manifest['stage_wall_seconds']}; largest task {result['task']}; "
              f"removed {quality['removed']} of {quality['planted']} planted, distinct removed "
              f"{quality['distinct_removed']}")
    per_core = runs[0][2]["input_bytes"] / 1e6 / sum(runs[0][2]["stage_wall_seconds"].values())
    cores = HOSTS * 240  # a v4-32's 4 hosts, 240 vCPUs each
    print(f"\n39B tokens (~160 GB of text) on a v4-32's {cores} vCPUs: {160e3 / (per_core * cores) / 60:.0f} min "
          f"at the 1-CPU run's {per_core:.2f} MB/s per core, {160e3 / (bound * cores) / 60:.0f} min at the "
          f"bound's {bound:.2f} (map stage only; the rest took under 10% here)")
    if args.stream_steps:
        out = os.path.join(tmp, "out-3")
        rate = time_stream(out, tokenizer, args.stream_steps)
        need = V4_32_TOKENS_PER_STEP / HOSTS / STEP_SECONDS
        print(f"stream (host 0 of 4, local disk): {rate:,.0f} tokens/s, {rate / need:.0f}x what a v4-32 host "
              f"consumes at 38% MFU ({need:,.0f} tokens/s)")


if __name__ == "__main__":
    main()
