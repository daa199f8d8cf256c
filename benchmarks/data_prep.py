"""Throughput of data.py: prepare's stages, prepare end to end on 1 and 2 processes, the stream.

    python benchmarks/data_prep.py                 # ~100 MB corpus (~15 min on 2 cores)
    python benchmarks/data_prep.py --mb=10 --stage_mb=2

1) Corpus: the bundled sample (samples/*.txt, 2.4 MB) scaled to --mb as JSONL files of chapter-sized
   documents. Each copy after the first replaces 30% of the words of every document by other
   words of the same document (seeded), so copies stay English/French but are not near
   duplicates (5-gram Jaccard ~0.2); the first copy's documents are repeated once more in full,
   so exact dedup has work to do.
2) Stages, one process, on the first --stage_mb of it: read (JSONL parse), clean, MinHash,
   language ID, tokenize, each timed alone (MB/s and documents/s), plus the LSH index
   (insert + query per document) and its memory per document (tracemalloc).
3) prepare end to end (--seq_len 2048), --num_workers 1 and 2: wall MB/s and documents/s.
4) The stream over the prepared shards: one host's slice (process 0 of 4) of a global batch of
   64 x 2049 tokens, from local disk and from gcp-storage-emulator (ranged reads over HTTP);
   tokens/s against what one of a v4-32's 4 hosts consumes: a quarter of ~2.1M tokens per step
   (1,024 x 2,048), at the report's 21 days / 300K steps (6.05 s per step) and at the 38% MFU it
   claims (6N x tokens / (0.38 x 16 chips x 275 TFLOP/s) = 4.5 s per step for 600M parameters).
   Also the share of time a consumer doing 20 ms of "compute" per step waits for `iterate`'s
   prefetch thread (`waits`).
Other processes on the same cores skew everything: check `uptime` first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
from tokenizer import Tokenizer, train_tokenizer  # noqa: E402

V4_32_TOKENS_PER_STEP = 1024 * 2048
STEP_SECONDS = {"21 days / 300K steps": 21 * 86400 / 300_000,
                "38% MFU, 600M": 6 * 599_906_560 * V4_32_TOKENS_PER_STEP / (0.38 * 16 * 275e12)}
HOSTS = 4


def make_corpus(directory: str, megabytes: float) -> list[str]:
    """JSONL files of ~--mb of distinct-enough documents built from the bundled sample."""
    sample = []
    for path in sorted(os.listdir(os.path.join(ROOT, "samples"))):
        if path.endswith(".txt"):
            sample += [d.text for d in data.iter_documents(os.path.join(ROOT, "samples", path))]
    size = sum(len(d.encode()) for d in sample)
    paths, written, copy = [], 0, 0
    rng = np.random.default_rng(0)
    while written < megabytes * 1e6:
        docs = sample
        if copy:
            docs = []
            for doc in sample:
                words = doc.split(" ")
                swap = rng.random(len(words)) < 0.3
                replacement = rng.integers(0, len(words), len(words))
                docs.append(" ".join(words[r] if s else w for w, s, r in zip(words, swap, replacement)))
        else:
            docs = sample + sample[: len(sample) // 10]  # exact duplicates for the exact stage
        path = os.path.join(directory, f"part-{copy:04d}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
        paths.append(path)
        written += os.path.getsize(path)
        copy += 1
    print(f"corpus: {len(paths)} files, {written / 1e6:.1f} MB (sample {size / 1e6:.1f} MB)", file=sys.stderr)
    return paths


def time_stages(paths: list[str], tokenizer: Tokenizer, megabytes: float) -> list[tuple]:
    rows = []
    started = time.perf_counter()
    docs, size = [], 0
    for path in paths:
        for doc in data.iter_documents(path):
            docs.append(doc.text)
            size += len(doc.text.encode())
        if size >= megabytes * 1e6:
            break
    rows.append(("read (JSONL)", size, len(docs), time.perf_counter() - started))
    data.detect_language("warm up: load the model")

    def timed(name, fn, items):
        started = time.perf_counter()
        out = [fn(x) for x in items]
        rows.append((name, size, len(items), time.perf_counter() - started))
        return out

    cleaned = timed("clean", lambda t: (data.clean_text(t), data.alnum_share(t)), docs)
    signatures = timed("minhash (128 perm)", lambda t: data.minhash(t, 128), [c for c, _ in cleaned])
    timed("language ID", data.detect_language, [c for c, _ in cleaned])
    timed("tokenize", lambda t: tokenizer.encode(t, bos=True, eos=True), [c for c, _ in cleaned])
    from datasketch import MinHashLSH

    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    started = time.perf_counter()
    for i, m in enumerate(signatures):
        lsh.query(m)
        lsh.insert(i, m)
    rows.append(("LSH query+insert", size, len(docs), time.perf_counter() - started))
    per_doc = (tracemalloc.get_traced_memory()[0] - before) / len(signatures)
    tracemalloc.stop()
    return rows, per_doc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_stream(spec: str, tokenizer: Tokenizer, steps: int) -> tuple[float, float]:
    """tokens/s read by process 0 of HOSTS, and the share of time a 20 ms/step consumer waits."""
    kwargs = dict(tokenizer=tokenizer, seq_len=2048, seed=0, global_batch_size=64, process_index=0,
                  process_count=HOSTS)
    stream = data.open_train_data(spec, **kwargs)
    stream.batch(0)
    started = time.perf_counter()
    for step in range(1, steps + 1):
        batch = stream.batch(step)
    rate = batch.size * steps / (time.perf_counter() - started)
    stream = data.open_train_data(spec, **kwargs)
    started = time.perf_counter()
    for step, _ in stream.iterate(0):
        time.sleep(0.02)
        if step == steps:
            break
    wait = stream.wait_seconds / (time.perf_counter() - started)
    stream.close()
    return rate, wait


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=100, help="corpus size in MB")
    parser.add_argument("--stage_mb", type=float, default=10, help="MB timed per stage (one process)")
    parser.add_argument("--workers", default="1,2", help="prepare's --num_workers values to time")
    parser.add_argument("--stream_steps", type=int, default=200)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}", file=sys.stderr)
    tmp = tempfile.mkdtemp(prefix="data_prep_bench_")
    try:
        run(args, tmp)
    finally:
        shutil.rmtree(tmp)


def run(args, tmp: str) -> None:
    tokenizer_path = train_tokenizer(sorted(os.path.join(ROOT, "samples", f) for f in os.listdir(
        os.path.join(ROOT, "samples")) if f.endswith(".txt")), os.path.join(tmp, "tok"), vocab_size=4096)
    tokenizer = Tokenizer.load(tokenizer_path)
    paths = make_corpus(tmp, args.mb)
    rows, lsh_bytes = time_stages(paths, tokenizer, args.stage_mb)
    for workers in [int(w) for w in args.workers.split(",")]:
        print(f"prepare, {workers} worker(s)...", file=sys.stderr)
        config = data.PrepareConfig(inputs=tuple(paths), output=os.path.join(tmp, f"out{workers}"),
                                    tokenizer=tokenizer_path, seq_len=2048, num_shards=8,
                                    languages=(("en", 0.7), ("fr", 0.3)), num_workers=workers)
        started = time.perf_counter()
        manifest = data.prepare(config)
        rows.append((f"prepare, {workers} process{'es' if workers > 1 else ''}", manifest["input_bytes"],
                     manifest["documents"]["read"], time.perf_counter() - started))
    local = os.path.join(tmp, f"out{workers}")

    port = free_port()
    emulator = subprocess.Popen(["gcp-storage-emulator", "start", "--host", "127.0.0.1", "--port", str(port),
                                 "--in-memory", "--default-bucket", "bench"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        for name in os.listdir(local):
            if name.endswith((".bin", ".json")):
                with open(os.path.join(local, name), "rb") as f:
                    data.write_bytes(f"gs://bench/corpus/{name}", f.read())
        stream_rows = [("local disk", *time_stream(local, tokenizer, args.stream_steps)),
                       ("gs:// (emulator)", *time_stream("gs://bench/corpus", tokenizer, args.stream_steps))]
    finally:
        emulator.terminate()

    print(f"\nload average after: {os.getloadavg()[0]:.2f} (2 cores shared with other processes)")
    print(f"{'stage':<24}{'MB':>8}{'documents':>11}{'seconds':>9}{'MB/s':>8}{'docs/s':>9}")
    for name, size, docs, seconds in rows:
        print(f"{name:<24}{size / 1e6:>8.1f}{docs:>11,}{seconds:>9.1f}{size / 1e6 / seconds:>8.2f}"
              f"{docs / seconds:>9.1f}")
    print(f"LSH index memory: {lsh_bytes / 1024:.2f} KiB per document (num_perm 128)")
    needs = {name: V4_32_TOKENS_PER_STEP / HOSTS / s for name, s in STEP_SECONDS.items()}
    print("\none v4-32 host needs " + ", ".join(f"{need:,.0f} tokens/s ({name}, {STEP_SECONDS[name]:.2f} s/step)"
                                                for name, need in needs.items()))
    print(f"{'stream (host 0 of 4)':<24}{'tokens/s':>14}{'waits':>8}" + "".join(f"{'x need ' + str(i + 1):>10}"
                                                                         for i in range(len(needs))))
    for name, rate, wait in stream_rows:
        print(f"{name:<24}{rate:>14,.0f}{wait:>8.1%}" + "".join(f"{rate / need:>10.1f}" for need in needs.values()))

if __name__ == "__main__":
    main()
