"""data.py (the corpus pipeline: local worker processes, or Ray), documents.py, storage.py and
stream.py (the shard format and the stream train.py reads), on real text, a real Ray cluster in a
private network namespace and a GCS emulator."""

import dataclasses
import gzip
import hashlib
import http.client
import glob
import itertools
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import threading
import textwrap
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import psutil
import pytest
import zstandard

import data
import documents
import prepare_config
import stages
import storage
import stream
import forked
from conftest import DATA_FILES, REPO, ray_nodes_taking_tasks, run_script, start_ray_node, stop_ray_node
from tokenizer import BOS_ID, CODE_ID, ENDCODE_ID, EOS_ID, Tokenizer, train_tokenizer
from tokenizer_files import open_tokenizer

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "text")


def paragraph_documents(paragraphs: list[str], chars: int) -> list[str]:
    """Consecutive paragraphs joined into documents of about `chars` characters (the rest dropped)."""
    docs, current = [], ""
    for paragraph in paragraphs:
        current = f"{current}\n{paragraph}" if current else paragraph
        if len(current) >= chars:
            docs.append(current)
            current = ""
    return docs


def fixture_documents(name: str, chars: int = 1500) -> list[str]:
    """A fixture novel cut at paragraph boundaries into documents of about `chars` characters."""
    with open(os.path.join(FIXTURES, name), encoding="utf-8") as f:
        return paragraph_documents([line.strip() for line in f if line.strip()], chars)


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return str(path)


SETTINGS = dict(seq_len=64, num_shards=2, languages=(("en", None), ("fr", None)), validation_fraction=0.05,
                block_records=4)
CLI_SETTINGS = ["--seq_len=64", "--num_shards=2", "--languages=en,fr", "--validation_fraction=0.05",
                "--block_records=4"]
TINY_SPLIT_MB = 0.004  # 4 KB: each ~15 KB corpus file becomes 4 map tasks (byte ranges)


def config(tmp_path, inputs, tokenizer_path, **overrides) -> data.PrepareConfig:
    settings = dict(inputs=tuple(inputs), output=str(tmp_path / "out"), tokenizer=tokenizer_path,
                    num_partitions=4, **SETTINGS)
    settings.update(overrides)
    return data.PrepareConfig(**settings)


def shard_records(directory, manifest, split="train") -> np.ndarray:
    """All records of a split, read straight from the files with NumPy."""
    shards = manifest["shards"] if split == "train" else manifest["validation"]["shards"]
    parts = [np.fromfile(os.path.join(directory, s["name"]), manifest["dtype"]) for s in shards]
    return np.concatenate(parts).reshape(-1, manifest["record_len"])


def documents_of(tokens: np.ndarray, tokenizer: Tokenizer) -> list[str]:
    """Decoded `<s> ... </s>` spans of a token stream (whole documents only: where shards or
    splits are concatenated, a document cut at the end of one is skipped)."""
    text = []
    starts = np.flatnonzero(tokens == BOS_ID)
    for a, b in zip(starts, starts[1:]):
        if tokens[b - 1] == EOS_ID and not (tokens[a + 1:b - 1] == EOS_ID).any():
            text.append(tokenizer.decode(tokens[a + 1:b - 1].tolist()))
    return text


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_path):
    return open_tokenizer(tiny_tokenizer_path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Real English and French documents (novels not in samples/) as JSONL, one file per novel, with
    a source field: (paths, English documents, French documents)."""
    directory = tmp_path_factory.mktemp("corpus")
    paths, en, fr = [], [], []
    for name, source, into in [("en_bronte", "novels_en", en), ("fr_verne", "novels_fr", fr),
                               ("en_wells", "novels_en", en), ("fr_balzac", "novels_fr", fr)]:
        docs = fixture_documents(f"{name}.txt")
        into += docs
        paths.append(write_jsonl(directory / f"{name}.jsonl", [{"text": t, "source": source} for t in docs]))
    return tuple(paths), en, fr


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus, tiny_tokenizer_path):
    """The corpus prepared by one local worker process: (directory, manifest)."""
    tmp = tmp_path_factory.mktemp("prepared")
    manifest = data.prepare(config(tmp, corpus[0], tiny_tokenizer_path, num_cpus=1))
    return str(tmp / "out"), manifest


def shard_bytes(directory) -> dict:
    """The shard files of an output, by name (manifests differ in their timings: see `steady`)."""
    return {p.name: p.read_bytes() for p in pathlib.Path(directory).glob("*.bin")}


def steady(manifest: dict) -> dict:
    """A manifest without its timings."""
    return {k: v for k, v in manifest.items() if k not in data.VOLATILE_KEYS}


# ----------------------------------------------------------------------------- prepare
def test_language_id_keeps_english_and_french_and_drops_german_and_spanish():
    for name, lang in [("en_bronte.txt", "en"), ("en_wells.txt", "en"), ("fr_verne.txt", "fr"),
                       ("fr_balzac.txt", "fr")]:
        results = [documents.detect_language(doc) for doc in fixture_documents(name)]
        assert all(r[0] == lang for r in results), (name, results)
        assert np.mean([r[1] >= 0.8 for r in results]) >= 0.9, (name, results)
    for name in ["de_eltec_DEU060.txt", "es_eltec_SPA3026.txt"]:
        results = [documents.detect_language(doc) for doc in fixture_documents(name)]
        assert not any(lang in ("en", "fr") for lang, _ in results), (name, results)


def test_prepare_keeps_every_english_and_french_document_whole(prepared, corpus, tokenizer):
    directory, manifest = prepared
    en, fr = corpus[1], corpus[2]
    records = np.concatenate([shard_records(directory, manifest), shard_records(directory, manifest, "validation")])
    decoded = documents_of(records.ravel(), tokenizer)
    # Every whole document in the records is one of the inputs, each at most once; only documents
    # cut by a shard's dropped tail or by a shard boundary can be missing (two per shard).
    assert set(decoded) <= set(en + fr) and len(decoded) == len(set(decoded))
    assert len(decoded) >= len(en + fr) - 2 * len(manifest["shards"])
    assert manifest["documents"] == {"read": len(en + fr), "cleaned": len(en + fr),
                                     "exact_dedup": len(en + fr), "near_dedup": len(en + fr),
                                     "language_kept": len(en + fr)}
    assert manifest["languages"]["en"]["documents"] == len(en)
    assert manifest["languages"]["en"]["tokens"] == sum(len(tokenizer.encode(d)) + 2 for d in en)
    assert set(manifest["sources"]) == {"novels_en", "novels_fr"}
    keys = list(manifest)
    demanded = ["seq_len", "vocab_size", "dtype", "tokenizer", "shards", "sequences", "tokens",
                "documents", "languages", "sources", "settings"]
    assert [k for k in keys if k in demanded] == demanded
    assert list(manifest["documents"]) == ["read", "cleaned", "exact_dedup", "near_dedup", "language_kept"]
    # Shard files match the manifest's sizes and hashes, computed here with hashlib.
    for shard in manifest["shards"] + manifest["validation"]["shards"]:
        with open(os.path.join(directory, shard["name"]), "rb") as f:
            blob = f.read()
        assert hashlib.sha256(blob).hexdigest() == shard["sha256"]
        assert len(blob) == shard["sequences"] * 65 * 2
    assert manifest["sequences"] == sum(s["sequences"] for s in manifest["shards"])
    assert manifest["tokens"] == manifest["sequences"] * 65 and manifest["dtype"] == "<u2"
    assert manifest["validation"]["sequences"] == max(1, round(0.05 * (manifest["sequences"] + manifest["validation"]["sequences"])))
    assert manifest["tokenizer"] == hashlib.sha256(tokenizer.model_bytes).hexdigest()


def jaccard_of_word_5grams(a: str, b: str) -> float:
    def grams(t):
        w = re.findall(r"\w+", t.lower())
        return {tuple(w[i:i + 5]) for i in range(len(w) - 4)}
    return len(grams(a) & grams(b)) / len(grams(a) | grams(b))


def test_near_duplicates_with_a_few_words_changed_are_removed_and_distinct_documents_kept(
        tmp_path, tiny_tokenizer_path):
    originals = fixture_documents("en_bronte.txt", chars=3000)[:4]
    variants = []
    for i, doc in enumerate(originals):
        words = doc.split(" ")
        for j in (10, len(words) // 2, len(words) - 10):  # three words changed
            words[j] = ["lantern", "orchard", "quietly"][i % 3]
        variants.append(" ".join(words))
    for original, variant in zip(originals, variants):  # the premise, measured independently
        assert 0.8 < jaccard_of_word_5grams(original, variant) < 1
    assert max(jaccard_of_word_5grams(a, b) for a, b in itertools.combinations(originals, 2)) < 0.2
    exact_copy = originals[0]
    path = write_jsonl(tmp_path / "dups.jsonl", [{"text": t} for t in originals + variants + [exact_copy]])
    manifest = data.prepare(config(tmp_path, [path], tiny_tokenizer_path, num_shards=1,
                                   languages=(("en", None),)))
    n = len(originals)
    assert manifest["documents"] == {"read": 2 * n + 1, "cleaned": 2 * n + 1, "exact_dedup": 2 * n,
                                     "near_dedup": n, "language_kept": n}


def test_lsh_bands_and_components_equal_their_references():
    from datasketch.lsh import _optimal_param
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    for threshold in (0.5, 0.7, 0.8, 0.9):
        for num_perm in (64, 128, 256):
            assert documents.lsh_bands(threshold, num_perm) == _optimal_param(threshold, num_perm, 0.1, 0.9)
    rng = np.random.default_rng(0)
    for n, m in ((1, 0), (50, 30), (300, 200), (300, 600)):
        edges = rng.integers(0, n, (m, 2))
        chain = rng.permutation(n)  # a long path: many rounds of linking
        edges = np.concatenate([edges, np.stack([chain[:-1], chain[1:]], axis=1)[: n // 3]])
        _, label = connected_components(coo_matrix((np.ones(len(edges)), edges.T), shape=(n, n)), directed=False)
        smallest = np.full(label.max() + 1, n)
        np.minimum.at(smallest, label, np.arange(n))
        assert (stages.smallest_in_component(edges, n) == smallest[label]).all()


def test_cleaning_drops_short_long_and_symbol_heavy_documents_and_normalises(
        tmp_path, tiny_tokenizer_path, tokenizer):
    prose = fixture_documents("en_wells.txt", chars=400)
    too_long = (prose[1] + " ") * (500_001 // len(prose[1]) + 1)
    records = [{"text": "Cafe\u0301 " + prose[0] + "\x07"},  # NFD é and a bell character
               {"text": "Too short."}, {"text": too_long}, {"text": "#### | ---- | ==== | " * 30},
               {"text": prose[2]}]
    path = write_jsonl(tmp_path / "clean.jsonl", records)
    manifest = data.prepare(config(tmp_path, [path], tiny_tokenizer_path, num_shards=1, dedup=False,
                                   languages=(("en", None),), seq_len=16, validation_fraction=0))
    assert manifest["documents"]["read"] == 5 and manifest["documents"]["cleaned"] == 2
    text = tokenizer.decode(shard_records(str(tmp_path / "out"), manifest).ravel().tolist())
    assert "Caf\u00e9 " + prose[0][:50] in text and prose[2][:50] in text
    assert "\x07" not in text and "e\u0301" not in text and "####" not in text and "Too short" not in text


@pytest.mark.slow
def test_output_is_identical_locally_on_one_and_two_cpus_and_on_ray_with_one_and_two_nodes(
        tmp_path, corpus, tiny_tokenizer_path, prepared, ray_cluster, netns):
    directory, manifest = prepared  # one local worker, 4 key partitions
    inputs = ["--input=" + ",".join(corpus[0]), f"--tokenizer={tiny_tokenizer_path}", *CLI_SETTINGS]
    # Two local workers, from the command line, 7 partitions.
    run_script("data.py", "prepare", *inputs, f"--output={tmp_path / 'cpus'}", "--num_cpus=2", "--num_partitions=7")
    # The session's one-CPU Ray cluster; then a second one-CPU node joins it: 1 partition.
    address = ray_cluster[0]
    run_script("data.py", "prepare", *inputs, f"--output={tmp_path / 'ray'}", f"--ray_address={address}",
               netns=netns)
    node = start_ray_node(netns, str(tmp_path / "node.log"), f"--address={address}", "--num-cpus=1")
    try:
        assert ray_nodes_taking_tasks(netns, address) == ["2", "2"]
        run_script("data.py", "prepare", *inputs, f"--output={tmp_path / 'nodes'}", f"--ray_address={address}",
                   "--num_partitions=1", netns=netns)
    finally:
        stop_ray_node(node)
    cfg = config(tmp_path, corpus[0], tiny_tokenizer_path, output=str(tmp_path / "nodes"))
    assert len({data.load_meta(cfg, k)["summary"]["node"] for k in range(len(corpus[0]))}) == 2
    expected = shard_bytes(directory)
    for run in ("cpus", "ray", "nodes"):
        assert shard_bytes(tmp_path / run) == expected, run
        assert steady(json.loads((tmp_path / run / "manifest.json").read_text())) == steady(manifest), run


def local_workers() -> list[psutil.Process]:
    """The worker processes a local executor of this process started: its children running its
    command line (forked) or multiprocessing's (spawned)."""
    me = psutil.Process()
    return [p for p in me.children() if p.cmdline() == me.cmdline() or "spawn_main" in " ".join(p.cmdline())]


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_the_output_is_identical(tmp_path, corpus, tiny_tokenizer_path,
                                                                prepared, caplog):
    result: dict = {}

    def run():
        try:
            result["manifest"] = data.prepare(config(tmp_path, corpus[0], tiny_tokenizer_path, num_cpus=1))
        except BaseException as e:  # re-raised below
            result["error"] = e

    driver = threading.Thread(target=run)
    driver.start()
    killed = None
    while driver.is_alive() and killed is None:
        for process in local_workers():
            try:
                process.kill()  # SIGKILL, whatever it is doing
                killed = process.pid
                break
            except psutil.Error:
                continue
        time.sleep(0.01)
    driver.join()
    if "error" in result:
        raise result["error"]
    assert killed, "no worker was caught running"
    assert "a worker process died" in caplog.text
    directory, manifest = prepared
    assert shard_bytes(tmp_path / "out") == shard_bytes(directory)
    assert steady(result["manifest"]) == steady(manifest)


@pytest.mark.slow
def test_a_killed_driver_resumes_without_redoing_finished_splits_and_writes_identical_shards(
        tmp_path, corpus, tiny_tokenizer_path, prepared):
    out = tmp_path / "out"
    command = [sys.executable, "data.py", "prepare", "--input=" + ",".join(corpus[0]), f"--output={out}",
               f"--tokenizer={tiny_tokenizer_path}", "--num_cpus=2", "--num_partitions=4",
               f"--split_mb={TINY_SPLIT_MB}", *CLI_SETTINGS]  # byte ranges: the unit of resumption
    driver = forked.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    workers: list = []
    while not list((out / "_stages").glob("map-*.meta.npz")):
        assert driver.poll() is None and time.time() < deadline, "the driver ended before any file was mapped"
        workers = psutil.Process(driver.pid).children() or workers
        time.sleep(0.02)
    driver.kill()
    driver.wait()
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert workers and not alive, "the killed driver's workers outlived it"
    assert not (out / "manifest.json").exists()
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "_stages").glob("map-*.meta.npz")}
    forked.run(command, cwd=REPO, check=True, capture_output=True)
    assert {name: (out / "_stages" / name).stat().st_mtime_ns for name in finished} == finished
    directory, manifest = prepared
    assert shard_bytes(out) == shard_bytes(directory)
    assert steady(json.loads((out / "manifest.json").read_text())) == steady(manifest)


def test_a_local_run_listens_on_no_socket_connects_nowhere_and_starts_no_ray(tmp_path, corpus, tiny_tokenizer_path):
    command = [sys.executable, "-X", "importtime", "data.py", "prepare", "--input=" + ",".join(corpus[0]),
               f"--output={tmp_path / 'out'}", f"--tokenizer={tiny_tokenizer_path}", "--num_cpus=2",
               *CLI_SETTINGS]
    driver = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = []
    reader = threading.Thread(target=lambda: stderr.extend(driver.stderr))
    reader.start()
    seen, sockets = set(), []
    while driver.poll() is None:
        try:
            tree = [psutil.Process(driver.pid), *psutil.Process(driver.pid).children(recursive=True)]
            for process in tree:
                seen.add((process.pid, " ".join(process.cmdline())))
                sockets += [(process.pid, c) for c in process.net_connections(kind="all")
                            if c.status == psutil.CONN_LISTEN or c.family != socket.AF_UNIX]
        except psutil.Error:
            continue
        time.sleep(0.02)
    reader.join()
    assert driver.returncode == 0, "".join(stderr[-20:])
    assert len(seen) >= 3, seen  # the driver and its two workers were seen
    assert not sockets, sockets  # nothing listening, no TCP or UDP socket at all
    assert not [c for _, c in seen if re.search(r"ray::|raylet|gcs_server|/ray/", c)], seen
    imported = [line.rsplit("|", 1)[1].strip() for line in stderr if line.startswith("import time:")]
    assert "numpy" in imported and not [m for m in imported if m == "ray" or m.startswith("ray.")]


def test_planted_near_duplicates_are_found_across_files_with_precision_and_recall_above_095(
        tmp_path, tiny_tokenizer_path):
    from benchmarks.data_prep import dedup_quality, planted_corpus, removed_by_julian

    files, truth = planted_corpus(str(tmp_path / "planted"), distinct=240, files=3, seed=1)
    cfg = config(tmp_path, files, tiny_tokenizer_path, language_id=False, languages=(("en", None),),
                 num_shards=1, seq_len=256)
    manifest = data.prepare(cfg)
    quality = dedup_quality(removed_by_julian(cfg), truth)
    assert quality["precision"] >= 0.95 and quality["recall"] >= 0.95, quality
    assert quality["distinct_removed"] == 0, quality
    assert quality["cross_file_pairs_found"] > 0, quality
    assert manifest["documents"]["exact_dedup"] == manifest["documents"]["cleaned"] - truth["exact_copies"]


def test_code_skips_language_id_is_wrapped_in_code_markers_and_gets_its_share(
        tmp_path, corpus, tiny_tokenizer_path, tokenizer):
    code = sorted(glob.glob(os.path.join(REPO, "*.py")) + glob.glob(os.path.join(REPO, "tests", "*.py")))
    # The premise: language ID would drop it (English, but below the 0.8 confidence).
    texts = [pathlib.Path(p).read_text() for p in code]
    assert sum(documents.detect_language(t)[1] < 0.8 for t in texts) > len(code) / 2
    stack = write_jsonl(tmp_path / "stack.jsonl", [{"text": t, "source": "stack"} for t in texts[:3]])
    manifest = data.prepare(config(tmp_path, [*corpus[0], *code, stack], tiny_tokenizer_path,
                                   languages=(("en", 0.5), ("fr", 0.2), ("code", 0.3)), code_sources=("stack",),
                                   dedup=True, seq_len=128))
    cleaned = manifest["documents_by_source"]["cleaned"]
    kept = sum(documents.keep_after_cleaning(documents.clean_text(t), True, 100, 500_000, 0.7, 0.25)
               for t in texts)
    assert cleaned["code"] == kept and cleaned["stack"] == 3 and kept >= len(code) - 2
    assert manifest["documents_by_source"]["exact_dedup"]["stack"] == 0  # copies of earlier files
    assert manifest["documents_by_language"]["language_kept"]["code"] == kept
    tokens = {lang: e["tokens"] for lang, e in manifest["languages"].items()}
    # Whole files are few and long: the draw of copies is coarse, the share only roughly reached.
    assert abs(tokens["code"] / sum(tokens.values()) - 0.3) < 0.1, tokens
    records = shard_records(str(tmp_path / "out"), manifest).ravel()
    starts, ends = np.flatnonzero(records == CODE_ID), np.flatnonzero(records == ENDCODE_ID)
    assert len(starts) and all(records[i - 1] == BOS_ID for i in starts if i)
    assert all(records[i + 1] == EOS_ID for i in ends if i + 1 < len(records))
    first_whole = next(s for s in starts if ends[ends > s].size)
    assert "def " in tokenizer.decode(records[first_whole + 1:ends[ends > first_whole][0]].tolist())


def test_mixture_reaches_the_requested_token_shares(tmp_path, corpus, tiny_tokenizer_path):
    manifest = data.prepare(config(tmp_path, corpus[0], tiny_tokenizer_path,
                                   languages=(("en", 0.7), ("fr", 0.3)), seq_len=32))
    tokens = {lang: e["tokens"] for lang, e in manifest["languages"].items()}
    assert abs(tokens["en"] / sum(tokens.values()) - 0.7) < 0.08, tokens
    # Checked on the shards themselves: count the tokens of each language's documents.
    en, fr = set(corpus[1]), set(corpus[2])
    records = shard_records(str(tmp_path / "out"), manifest)
    docs = documents_of(records.ravel(), open_tokenizer(tiny_tokenizer_path))
    en_chars = sum(len(d) for d in docs if d in en)
    fr_chars = sum(len(d) for d in docs if d in fr)
    assert abs(en_chars / (en_chars + fr_chars) - 0.7) < 0.1


def test_rerun_resumes_a_partial_output_refuses_other_settings_and_reports_done(
        tmp_path, corpus, tiny_tokenizer_path, prepared, capsys):
    directory, first = prepared
    out = copy_of(directory, tmp_path)
    cfg = config(tmp_path, corpus[0], tiny_tokenizer_path, output=str(out))
    full = shard_bytes(out)
    # A run killed before the end: no manifest, one shard missing.
    os.remove(out / "manifest.json")
    os.remove(out / first["shards"][1]["name"])
    second = data.prepare(cfg)
    assert steady(second) == steady(first)
    assert shard_bytes(out) == full
    data.prepare(cfg)
    assert "nothing to do" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"other settings \(differing: seq_len\)"):
        data.prepare(config(tmp_path, corpus[0], tiny_tokenizer_path, seq_len=32, output=str(out)))
    os.remove(out / "manifest.json")  # a partial run is protected too
    with pytest.raises(ValueError, match="partial run with other settings"):
        data.prepare(config(tmp_path, corpus[0], tiny_tokenizer_path, seed=1, output=str(out)))


def test_all_input_formats_give_the_same_documents(tmp_path, corpus):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"text": t, "lang": "en", "source": "s"} for t in corpus[1][:5]]
    lines = "".join(json.dumps(r) + "\n" for r in records).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "a.parquet")
    (tmp_path / "s.txt").write_text("\n\n".join(r["text"] for r in records) + "\n")
    expected = [(r["text"], "en", "s") for r in records]
    for name in ("a.jsonl.gz", "a.jsonl.zst", "a.parquet"):
        got = [(d.text, d.lang, d.source) for d in documents.iter_documents(str(tmp_path / name))]
        assert got == expected, name
    got = [(d.text, d.source) for d in documents.iter_documents(str(tmp_path / "s.txt"))]
    assert got == [(t, "s") for t, _, _ in expected]


# ----------------------------------------------------------------------------- the report's five sources
def sample_documents(name: str, chars: int, first: int, count: int) -> list[str]:
    """`count` documents of about `chars` characters, consecutive paragraphs of a bundled novel
    from its `first` paragraph on."""
    with open(os.path.join(REPO, "samples", name), encoding="utf-8") as f:
        docs = paragraph_documents([line.strip() for line in f if len(line.strip()) > 40][first:], chars)
    assert len(docs) >= count, f"{name} holds fewer than {count} documents of {chars} characters from {first}"
    return docs[:count]


def code_snippets(count: int) -> list[str]:
    """The repository's functions, one document each (their first 1,000 characters: documents
    small beside a source's target, which the mixture reaches to within one document)."""
    out = []
    for path in sorted(glob.glob(os.path.join(REPO, "*.py"))):
        text = pathlib.Path(path).read_text()
        out += [("def " + part)[:1000] for part in text.split("\ndef ")[1:] if len(part) > 300]
    assert len(out) >= count, len(out)
    return out[:count]


GUTENBERG_HEADER = ("The Project Gutenberg eBook of {title}\n\nThis eBook is for the use of anyone anywhere...\n\n"
                    "*** START OF THE PROJECT GUTENBERG EBOOK {title} ***\n\n")
GUTENBERG_FOOTER = "\n\n*** END OF THE PROJECT GUTENBERG EBOOK {title} ***\n\nSection 1. General Terms of Use...\n"


def write_mirror(root: pathlib.Path) -> dict:
    """A mirror of the report's five sources, a few hundred records each, in each one's own layout
    and schema: Wikipedia (wikimedia/wikipedia Parquet, one folder per language), OSCAR 2301
    (`content` and `metadata` in .jsonl.zst, one folder per language; some records flagged noisy),
    FineWeb-Edu (Parquet with its language and score columns), Project Gutenberg (plain-text books
    with the licence header and footer), The Stack (`content` Parquet, one folder per programming
    language). Returns the documents written per source."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def parquet(path, rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), path)

    written = {}
    for lang, name in (("en", "en_doyle_sign_of_four.txt"), ("fr", "fr_flaubert_madame_bovary_part.txt")):
        docs = sample_documents(name, 400, 0, 100)
        written.setdefault("wikipedia", []).extend(docs)
        parquet(root / "wikipedia" / f"20231101.{lang}" / "train-00000-of-00001.parquet",
                [{"id": str(i), "url": f"https://{lang}.wikipedia.org/wiki?curid={i}", "title": f"T{i}", "text": t}
                 for i, t in enumerate(docs)])
    for lang, name in (("en", "en_dickens_dombey_and_son_part.txt"), ("fr", "fr_maupassant_bel_ami.txt")):
        docs = sample_documents(name, 400, 0, 120)
        noisy = docs[::10]  # OSCAR flags them; the recipe drops them
        written.setdefault("oscar", []).extend(d for d in docs if d not in noisy)
        written.setdefault("oscar_noisy", []).extend(noisy)
        folder = root / "oscar" / f"{lang}_meta"
        folder.mkdir(parents=True)
        lines = "".join(json.dumps({
            "content": t, "warc_headers": {"warc-type": "conversion", "content-length": str(len(t))},
            "metadata": {"identification": {"label": lang, "prob": 0.97}, "harmful_pp": 1000.0, "tlsh": "tlsh:T1",
                         "quality_warnings": ["noisy"] if t in noisy else (["short_sentences"] if i % 3 else None),
                         "categories": None, "sentence_identifications": []}}, ensure_ascii=False) + "\n"
            for i, t in enumerate(docs))
        (folder / f"{lang}_meta_part_1.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    docs = sample_documents("en_dickens_dombey_and_son_part.txt", 400, 1500, 150)
    written["fineweb_edu"] = docs
    parquet(root / "fineweb-edu" / "sample" / "10BT" / "000_00000.parquet",
            [{"text": t, "id": f"<urn:uuid:{i}>", "dump": "CC-MAIN-2024-10", "url": "https://example.org",
              "file_path": "s3://commoncrawl/...", "language": "en", "language_score": 0.95, "token_count": len(t) // 4,
              "score": 3.1, "int_score": 3} for i, t in enumerate(docs)])
    for lang, name, number in (("en", "en_dickens_dombey_and_son_part.txt", 821),
                               ("fr", "fr_maupassant_bel_ami.txt", 4647)):
        docs = sample_documents(name, 400, 2500, 40)
        written.setdefault("gutenberg", []).extend(docs)
        book = root / "gutenberg" / lang / f"pg{number}.txt"
        book.parent.mkdir(parents=True)
        title = f"Book {number}"
        # Hard-wrapped at 70 columns with CRLF line ends, as Gutenberg's plain-text files are.
        body = "\n\n".join("\n".join(textwrap.wrap(p, 70, break_on_hyphens=False, break_long_words=False))
                           for d in docs for p in d.split("\n"))
        book.write_bytes((GUTENBERG_HEADER.format(title=title) + body + GUTENBERG_FOOTER.format(title=title))
                         .replace("\n", "\r\n").encode())
    code = code_snippets(240)
    written["stack"] = code
    for i, language in enumerate(("python", "javascript")):
        part = code[i::2]
        parquet(root / "the-stack-dedup" / "data" / language / "data-00000-of-00001.parquet",
                [{"hexsha": hashlib.sha1(t.encode()).hexdigest(), "size": len(t), "ext": "py", "lang": "Python",
                  "max_stars_repo_path": f"f{j}.py", "content": t, "avg_line_length": 30.0, "max_line_length": 90,
                  "alphanum_fraction": 0.6} for j, t in enumerate(part)])
    return written


REPORT_FLAGS = os.path.join(REPO, "configs", "corpus_report.flags")


def test_each_source_is_read_in_its_own_layout(tmp_path):
    written = write_mirror(tmp_path)
    recipe = prepare_config.parse_sources([line.strip()[len("--source="):] for line in open(REPORT_FLAGS)
                                           if line.startswith("--source=")])
    config = data.PrepareConfig(inputs=(str(tmp_path),), output="", tokenizer="", sources=recipe,
                                text_fields=(("oscar", "content"), ("stack", "content")), book_sources=("gutenberg",),
                                max_chars=3000)
    files = data.input_files(config)
    assert {source for _, source in files} == {"wikipedia", "oscar", "fineweb_edu", "gutenberg", "stack"}
    read: dict = {}
    for path, source in files:
        for doc in documents.iter_documents(path, layout=stages.layout(config, path, source)):
            assert isinstance(doc, documents.Document), doc
            read.setdefault(source, []).append(doc)
    assert [d.text for d in read["wikipedia"]] == written["wikipedia"]
    assert [d.text for d in read["fineweb_edu"]] == written["fineweb_edu"]
    assert {(d.lang, d.lang_score) for d in read["fineweb_edu"]} == {("en", 0.95)}
    oscar = read["oscar"]
    assert sorted(d.text for d in oscar) == sorted(written["oscar"] + written["oscar_noisy"])
    assert {d.lang for d in oscar} == {"en", "fr"} and {d.lang_score for d in oscar} == {0.97}
    assert sorted(d.text for d in oscar if "noisy" in d.warnings) == sorted(written["oscar_noisy"])
    assert sorted(d.text for d in read["stack"]) == sorted(written["stack"])
    # A book: its licence header and footer gone, its hard-wrapped paragraphs whole again up to
    # their line breaks, parts of at most max_chars.
    books = "\n\n".join(d.text for d in read["gutenberg"])
    assert "PROJECT GUTENBERG" not in books and "\r" not in books
    assert all(len(d.text) <= 3000 for d in read["gutenberg"]) and len(read["gutenberg"]) > 2
    words = lambda t: t.split()  # noqa: E731
    assert words(books) == words(" ".join(written["gutenberg"]))
    with pytest.raises(ValueError, match="no column 'text'"):
        documents.check_input(files[-1][0])  # The Stack without its text column named
    assert documents.check_input(files[-1][0], "content") > 0


def test_the_report_recipe_reaches_each_source_token_target_within_one_percent(tmp_path, tiny_tokenizer_path):
    written = write_mirror(tmp_path / "mirror")
    tokenizer = open_tokenizer(tiny_tokenizer_path)
    tokens = {name: sum(len(t) for t in tokenizer.encode_batch(docs)) for name, docs in written.items()}
    # Downsample four sources (to 40-60% of what they hold, language ID and cleaning apart) and
    # repeat Gutenberg about 2.5 times.
    targets = {"wikipedia": 0.5 * tokens["wikipedia"], "oscar": 0.6 * tokens["oscar"],
               "fineweb_edu": 0.4 * tokens["fineweb_edu"], "gutenberg": 2.5 * tokens["gutenberg"],
               "stack": 0.4 * tokens["stack"]}
    spec = ",".join(f"{name}:{int(t)}" for name, t in targets.items())
    out = tmp_path / "out"
    run_script("data.py", "prepare", f"--flagfile={REPORT_FLAGS}", f"--input={tmp_path / 'mirror'}",
               f"--output={out}", f"--tokenizer={tiny_tokenizer_path}", f"--source_tokens={spec}", "--seq_len=128",
               "--num_shards=2", "--max_chars=3000", "--num_cpus=2")
    manifest = json.loads((out / "manifest.json").read_text())
    sources = manifest["sources"]
    for name, target in targets.items():
        assert sources[name]["target_tokens"] == int(target)
        assert abs(sources[name]["tokens"] / target - 1) < 0.01, (name, sources[name])
        assert sources[name]["short_tokens"] == 0
        assert sum(per["tokens"] for per in sources[name]["languages"].values()) == sources[name]["tokens"]
    assert 2 < sources["gutenberg"]["epochs"] < 3 and sources["wikipedia"]["epochs"] < 1
    assert set(sources["wikipedia"]["languages"]) == {"en", "fr"} and set(sources["stack"]["languages"]) == {"code"}
    assert set(sources["fineweb_edu"]["languages"]) == {"en"}
    assert manifest["quality_dropped"] == len(written["oscar_noisy"])  # OSCAR's noisy records
    # The survivors only were language-identified: OSCAR and FineWeb-Edu by their records' own
    # lid.176 answers, code not at all; each source's kept documents are at most those written.
    kept = manifest["documents_by_source"]["language_kept"]
    assert kept["oscar"] == len(written["oscar"]) and kept["fineweb_edu"] == len(written["fineweb_edu"])
    assert kept["wikipedia"] <= len(written["wikipedia"]) and kept["stack"] <= len(written["stack"])
    # Available and written tokens add up; the table says so too.
    assert manifest["languages"]["en"]["tokens"] == sum(s["languages"].get("en", {}).get("tokens", 0)
                                                        for s in sources.values())
    # The same recipe told to report a short source rather than repeat it: Gutenberg written once.
    out = tmp_path / "report"
    result = run_script("data.py", "prepare", f"--flagfile={REPORT_FLAGS}", f"--input={tmp_path / 'mirror'}",
                        f"--output={out}", f"--tokenizer={tiny_tokenizer_path}", f"--source_tokens={spec}",
                        "--seq_len=128", "--num_shards=2", "--max_chars=3000", "--short_sources=report")
    gutenberg = json.loads((out / "manifest.json").read_text())["sources"]["gutenberg"]
    assert gutenberg["tokens"] == gutenberg["available_tokens"] and gutenberg["epochs"] == 1
    assert gutenberg["short_tokens"] == int(targets["gutenberg"]) - gutenberg["available_tokens"] > 0
    assert re.search(rf"gutenberg\s+{int(targets['gutenberg']):,}\s+{gutenberg['available_tokens']:,}\s+"
                     rf"{gutenberg['tokens']:,}\s+\S+%\s+1.00\s+{gutenberg['short_tokens']:,}", result.stdout), result.stdout


# ----------------------------------------------------------------------------- byte-range splits
def splits_of(output) -> list[dict]:
    return json.loads((pathlib.Path(output) / "_stages" / data.SPLITS_FILE).read_text())


def tricky_text_file(path) -> bytes:
    """Documents separated by one or several blank lines, some holding spaces, CRLF or only a
    no-break space, a line of non-UTF-8 bytes, lines longer than a split, no final newline."""
    paragraphs = fixture_documents("en_wells.txt", chars=200)
    separators = ["\n\n", "\n  \n\n", "\r\n\r\n", "\n\n\n", "\n\u00a0\n"]
    text = "".join(p + separators[i % len(separators)] for i, p in enumerate(paragraphs))
    blob = text.encode().replace(b"\n\n", b"\n" + b"\xff\xfe broken\n\n", 1) + b"a last line, unterminated"
    pathlib.Path(path).write_bytes(blob)
    return blob


def read_in_ranges(path: str, size: int, split_bytes: int) -> list[tuple]:
    """(kind, file line, text) of every record of a file read split by split, with each split's
    line numbers moved by the lines of the splits before it (as the driver does)."""
    out, before = [], 0
    for start, end in documents.byte_ranges(path, size, split_bytes):
        tally: dict = {}
        for item in documents.iter_documents(path, start, end, tally):
            out.append((type(item).__name__, item.line + before, getattr(item, "text", None)))
            if isinstance(item, documents.BadRecord):  # the task's own count, for the fatal error
                assert documents.line_number(path, item.offset) == item.line + before
        before += tally["lines"]
    return out


def test_byte_ranges_read_every_record_once_wherever_the_boundaries_fall(tmp_path, corpus):
    text = tmp_path / "novel.txt"
    tricky_text_file(text)
    lines = [json.dumps({"text": t}) for t in corpus[1][:20]]
    lines[3], lines[7] = "{not json", ""
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_bytes(("\n".join(lines) + "\n").encode())
    for path in (str(text), str(jsonl)):
        size = os.path.getsize(path)
        whole = [(type(d).__name__, d.line, getattr(d, "text", None)) for d in documents.iter_documents(path)]
        assert len(whole) > 10 and any(kind == "BadRecord" for kind, _, _ in whole)
        for split_bytes in (1, 97, 1000, 4096, size - 1, size):  # 1 byte: every offset is a boundary
            assert len(documents.byte_ranges(path, size, split_bytes)) == -(-size // split_bytes)
            assert read_in_ranges(path, size, split_bytes) == whole, (path, split_bytes)
    # Compressed files are one split: a stream cannot be entered mid-way.
    assert documents.byte_ranges("a.jsonl.gz", 10**9, 1000) == [(0, None)]


def test_output_is_byte_identical_whatever_the_split_size(tmp_path, corpus, tiny_tokenizer_path, prepared):
    directory, manifest = prepared  # whole files
    cfg = config(tmp_path, corpus[0], tiny_tokenizer_path, split_mb=TINY_SPLIT_MB)
    split = data.prepare(cfg)
    splits = splits_of(cfg.output)
    assert len(splits) >= 3 * len(corpus[0]) and [s["file"] for s in splits] == sorted(s["file"] for s in splits)
    assert all(a["end"] == b["start"] for a, b in zip(splits, splits[1:]) if a["file"] == b["file"])
    assert shard_bytes(cfg.output) == shard_bytes(directory)
    assert steady(split) == steady(manifest)
    # A partial run resumes with its own split size only: its stage files are numbered by split.
    os.remove(pathlib.Path(cfg.output) / "manifest.json")
    with pytest.raises(ValueError, match=r"partial run with other settings \(differing: split_mb\)"):
        data.prepare(dataclasses.replace(cfg, split_mb=1))


def test_a_bad_record_in_a_later_split_is_named_by_its_file_line(tmp_path, corpus, tiny_tokenizer_path):
    good = [json.dumps({"text": t}) for t in corpus[1][:10]]
    path = tmp_path / "late.jsonl"
    path.write_text("\n".join(good[:8] + ["{not json"] + good[8:]) + "\n")
    split_mb = 0.003
    assert documents.byte_ranges(str(path), path.stat().st_size, int(split_mb * 1e6))[-2][0] < \
        len("\n".join(good[:8])) < documents.byte_ranges(str(path), path.stat().st_size, int(split_mb * 1e6))[-1][0]
    with pytest.raises(ValueError, match=re.escape(f"{path}:9: invalid JSON")):
        data.prepare(config(tmp_path, [str(path)], tiny_tokenizer_path, num_shards=1, split_mb=split_mb))
    lines = good[:2] + ["{not json"] + good[2:4] + [json.dumps({"txt": "x"})] + good[4:8] + ["[]"]
    counted = tmp_path / "counted.jsonl"
    counted.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"3 of 11 records are malformed, more than --max_bad_fraction"
                                                   f"=0.2: {counted}:3: invalid JSON")) as error:
        data.prepare(config(tmp_path, [str(counted)], tiny_tokenizer_path, num_shards=1, split_mb=split_mb,
                            max_bad_fraction=0.2, output=str(tmp_path / "b")))
    assert f"{counted}:6: no string field" in str(error.value) and f"{counted}:11: no string" in str(error.value)
    assert len(splits_of(tmp_path / "b")) >= 4


# ----------------------------------------------------------------------------- bad input
def test_bad_records_name_file_and_line_or_are_counted_up_to_the_allowed_fraction(
        tmp_path, corpus, tiny_tokenizer_path):
    good = [json.dumps({"text": t}) for t in corpus[1][:8]]
    lines = good[:2] + ["{not json"] + good[2:4] + [json.dumps({"txt": "x"})] + good[4:]
    path = tmp_path / "bad.jsonl"
    path.write_bytes("\n".join(lines).encode() + b"\n" + b"{\"text\": \"caf\xe9\"}\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: invalid JSON")):
        data.prepare(config(tmp_path, [str(path)], tiny_tokenizer_path, num_shards=1))
    with pytest.raises(ValueError, match="3 of 11 records are malformed"):
        data.prepare(config(tmp_path, [str(path)], tiny_tokenizer_path, num_shards=1, max_bad_fraction=0.2,
                            output=str(tmp_path / "b")))
    manifest = data.prepare(config(tmp_path, [str(path)], tiny_tokenizer_path, num_shards=1,
                                   max_bad_fraction=0.3, output=str(tmp_path / "c")))
    assert manifest["bad_records"] == 3 and manifest["documents"]["read"] == 8
    lines = [(b.where, b.problem) for b in documents.iter_documents(str(path)) if isinstance(b, documents.BadRecord)]
    assert lines == [(f"{path}:3", lines[0][1]), (f"{path}:6", "no string field 'text'"),
                     (f"{path}:11", "bytes that are not UTF-8")]
    text = tmp_path / "bad.txt"
    text.write_bytes(b"first document\n\nsecond \xff document\nstill second\n\nthird\n")
    assert [(type(d).__name__, d.where) for d in documents.iter_documents(str(text))] == [
        ("Document", f"{text}:1"), ("BadRecord", f"{text}:3"), ("Document", f"{text}:6")]


def test_file_level_problems_fail_at_once(tmp_path, tiny_tokenizer_path, gcs_bucket):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.jsonl is empty"):
        data.prepare(config(tmp_path, [str(tmp_path / "empty.jsonl")], tiny_tokenizer_path))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        data.prepare(config(tmp_path, [str(tmp_path / "missing*.jsonl")], tiny_tokenizer_path))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        data.prepare(config(tmp_path, [f"gs://{gcs_bucket}/nothing/*.jsonl"], tiny_tokenizer_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        storage.read_bytes(f"gs://{gcs_bucket}/no/such/object.jsonl")
    with pytest.raises(FileNotFoundError, match="no manifest"):
        stream.open_train_data(f"gs://{gcs_bucket}/nowhere", tokenizer=open_tokenizer(tiny_tokenizer_path),
                             seq_len=64, seed=0, global_batch_size=4)


# ----------------------------------------------------------------------------- stream
def open_stream(spec, tokenizer, **overrides):
    kwargs = dict(tokenizer=tokenizer, seq_len=64, seed=7, global_batch_size=8, grad_accum=2)
    kwargs.update(overrides)
    return stream.open_train_data(spec, **kwargs)


def test_one_epoch_of_the_stream_is_every_record_once(prepared, tokenizer, capsys):
    directory, manifest = prepared
    stream = open_stream(directory, tokenizer, global_batch_size=manifest["sequences"], grad_accum=1)
    epoch = stream.batch(0)
    expected = shard_records(directory, manifest).astype(np.int32)
    assert sorted(map(bytes, epoch)) == sorted(map(bytes, expected))
    assert stream.epoch(0) == 1.0 and stream.seq_len == 64 and stream.num_sequences == manifest["sequences"]
    assert not np.array_equal(epoch, expected)  # shuffled
    assert not np.array_equal(stream.batch(1), epoch)  # a new order each epoch
    for _ in zip(range(3), stream.iterate(0)):
        pass
    assert "epoch 1 begins during step 1" in capsys.readouterr().out
    stream.close()
    validation = open_stream(directory, tokenizer, split="validation", global_batch_size=1, grad_accum=1)
    assert validation.num_sequences == manifest["validation"]["sequences"]
    assert bytes(validation.batch(0)[0]) in set(map(bytes, shard_records(directory, manifest, "validation").astype(np.int32)))


def test_resuming_at_step_k_gives_the_batches_of_an_uninterrupted_run(prepared, tokenizer):
    directory, _ = prepared
    stream = open_stream(directory, tokenizer)
    uninterrupted = list(itertools.islice(stream.iterate(0), 30))
    resumed = list(itertools.islice(open_stream(directory, tokenizer).iterate(17), 13))
    for (s1, b1), (s2, b2) in zip(uninterrupted[17:], resumed):
        assert s1 == s2
        np.testing.assert_array_equal(b1, b2)
    assert [s for s, _ in uninterrupted] == list(range(30))
    stream.close()


@pytest.mark.parametrize("grad_accum,process_count", [(1, 2), (2, 2), (2, 4)])
def test_process_slices_together_are_the_one_process_batch(prepared, tokenizer, grad_accum, process_count):
    directory, _ = prepared
    one = open_stream(directory, tokenizer, grad_accum=grad_accum)
    parts = [open_stream(directory, tokenizer, grad_accum=grad_accum, process_index=p,
                         process_count=process_count) for p in range(process_count)]
    for step in (0, 5, 40):
        whole = one.batch(step).reshape(grad_accum, -1, 65)
        sliced = np.concatenate([p.batch(step).reshape(grad_accum, -1, 65) for p in parts], axis=1)
        np.testing.assert_array_equal(whole, sliced)
        assert parts[0].batch(step).shape == (8 // process_count, 65)


def test_stream_refuses_a_mismatched_model_or_batch_layout(prepared, tokenizer, tmp_path):
    directory, _ = prepared
    with pytest.raises(ValueError, match="seq_len=64, but the model's context is 32"):
        open_stream(directory, tokenizer, seq_len=32)
    other = open_tokenizer(train_tokenizer(DATA_FILES[:1], str(tmp_path / "other"), vocab_size=400))
    with pytest.raises(ValueError, match="another tokenizer"):
        open_stream(directory, other)
    with pytest.raises(ValueError, match="not divisible by grad_accum"):
        open_stream(directory, tokenizer, global_batch_size=6, grad_accum=2, process_count=2)
    with pytest.raises(ValueError, match="split='test'"):
        open_stream(directory, tokenizer, split="test")


def copy_of(directory: str, tmp_path) -> pathlib.Path:
    """A copy of a prepared output, for tests that damage it."""
    return pathlib.Path(shutil.copytree(directory, tmp_path / "copy"))


def test_truncated_or_corrupted_shards_are_refused(prepared, tokenizer, tmp_path):
    directory, manifest = prepared
    copy = copy_of(directory, tmp_path)
    shard = copy / manifest["shards"][0]["name"]
    blob = shard.read_bytes()
    shard.write_bytes(blob[:-2])
    with pytest.raises(ValueError, match=f"shard {re.escape(str(shard))} holds"):
        open_stream(str(copy), tokenizer)
    shard.write_bytes(blob[:100] + bytes([blob[100] ^ 1]) + blob[101:])
    with pytest.raises(ValueError, match="sha256"):
        open_stream(str(copy), tokenizer)


def test_a_failure_in_the_prefetch_thread_reaches_the_consumer(prepared, tokenizer, tmp_path):
    directory, manifest = prepared
    copy = copy_of(directory, tmp_path)
    stream = open_stream(str(copy), tokenizer)
    for shard in manifest["shards"]:
        os.remove(copy / shard["name"])  # gone after the stream checked them
    with pytest.raises(FileNotFoundError):
        for _ in stream.iterate(0):
            pass


def test_text_files_give_the_same_stream_interface(tokenizer):
    records = stream.open_train_data(",".join(DATA_FILES[:1]), tokenizer=tokenizer, seq_len=64, seed=3,
                                   global_batch_size=8, grad_accum=2, process_index=1, process_count=2)
    assert records.batch(4).shape == (4, 65) and records.batch(4).dtype == np.int32 and records.manifest is None
    whole = stream.TokenRecords(DATA_FILES[:1], tokenizer, 64, 3).batch(4, 8).reshape(2, 4, 65)
    np.testing.assert_array_equal(records.batch(4).reshape(2, 2, 65), whole[:, 2:])
    validation = stream.open_train_data(DATA_FILES[0], tokenizer=tokenizer, seq_len=64, seed=3,
                                      global_batch_size=1, split="validation")
    train_rows = set(map(bytes, stream.TokenRecords(DATA_FILES[:1], tokenizer, 64, 3).records))
    assert not set(map(bytes, validation.records)) & train_rows


# ----------------------------------------------------------------------------- GCS
class FaultyProxy(ThreadingHTTPServer):
    """Forwards HTTP to the emulator; every `every`-th GET fails: 503, a reset, or a cut body."""

    daemon_threads = True

    def __init__(self, upstream_port: int, every: int):
        self.upstream_port, self.every, self.requests, self.faults = upstream_port, every, 0, []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), ProxyHandler)


class ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        server = self.server
        with server.lock:
            server.requests += 1
            fault = None
            if self.command == "GET" and server.requests % server.every == 0:
                fault = ("503", "reset", "cut")[len(server.faults) % 3]
                server.faults.append(fault)
        if fault == "503":
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if fault == "reset":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        upstream = http.client.HTTPConnection("127.0.0.1", server.upstream_port, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        upstream.request(self.command, self.path, body, headers)
        response = upstream.getresponse()
        payload = response.read()
        self.send_response(response.status)
        for k, v in response.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if fault == "cut":  # the headers promise more than comes: a connection dropped mid-body
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward


@pytest.fixture(scope="module")
def on_gcs(corpus, tiny_tokenizer_path, gcs_bucket, tmp_path_factory):
    """The corpus, uploaded as .jsonl.gz, prepared from GCS to GCS: (URI, manifest)."""
    for i, path in enumerate(corpus[0]):  # inputs read through the client's streaming reader
        with open(path, "rb") as f:  # named so that the glob's order is the local run's
            storage.write_bytes(f"gs://{gcs_bucket}/raw/{i}-{os.path.basename(path)}.gz", gzip.compress(f.read()))
    uri = f"gs://{gcs_bucket}/corpus"
    tmp = tmp_path_factory.mktemp("gcs")
    # Inputs, stage files and shards all go through a proxy that fails every 7th GET.
    emulator = os.environ["STORAGE_EMULATOR_HOST"]
    proxy = FaultyProxy(int(emulator.rsplit(":", 1)[1]), every=7)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{proxy.server_address[1]}"
    try:
        manifest = data.prepare(config(tmp, [f"gs://{gcs_bucket}/raw/*.jsonl.gz"], tiny_tokenizer_path, output=uri))
    finally:
        os.environ["STORAGE_EMULATOR_HOST"] = emulator
        proxy.shutdown()
    assert {"503", "reset", "cut"} <= set(proxy.faults), proxy.faults
    return uri, manifest


def test_prepare_to_gcs_and_stream_from_it_despite_faults(prepared, on_gcs, tokenizer, monkeypatch):
    directory, manifest = prepared
    uri, gcs_manifest = on_gcs
    assert gcs_manifest["shards"] == manifest["shards"]  # the same bytes as the local run
    local = open_stream(directory, tokenizer)
    expected = [local.batch(step) for step in range(12)]
    emulator_port = int(os.environ["STORAGE_EMULATOR_HOST"].rsplit(":", 1)[1])
    proxy = FaultyProxy(emulator_port, every=3)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{proxy.server_address[1]}")
    try:
        remote = open_stream(uri + "/manifest.json", tokenizer, process_index=1, process_count=2)
        got = [b for _, b in itertools.islice(remote.iterate(0), 12)]
        remote.close()
    finally:
        proxy.shutdown()
    for step, batch in enumerate(got):
        np.testing.assert_array_equal(batch, expected[step].reshape(2, 2, 2, 65)[:, 1].reshape(-1, 65))
    assert {"503", "reset", "cut"} <= set(proxy.faults), proxy.faults


def test_a_replaced_gcs_shard_is_refused_without_reading_it(on_gcs, tokenizer):
    uri, manifest = on_gcs
    name = f"{uri}/{manifest['validation']['shards'][0]['name']}"
    original = storage.read_bytes(name)
    storage.write_bytes(name, bytes([original[0] ^ 1]) + original[1:])
    try:
        with pytest.raises(ValueError, match="crc32c"):
            open_stream(uri, tokenizer, split="validation", global_batch_size=1, grad_accum=1)
    finally:
        storage.write_bytes(name, original)


def test_gcs_inputs_are_read_in_byte_ranges_despite_faults(prepared, corpus, tiny_tokenizer_path, gcs_bucket,
                                                          tmp_path, monkeypatch):
    directory, manifest = prepared
    inputs = []
    for i, path in enumerate(corpus[0]):  # uncompressed: byte ranges of the objects
        inputs.append(f"gs://{gcs_bucket}/plain/{i}-{os.path.basename(path)}")
        storage.write_bytes(inputs[-1], pathlib.Path(path).read_bytes())
    text = tmp_path / "novel.txt"
    storage.write_bytes(f"gs://{gcs_bucket}/plain/novel.txt", tricky_text_file(text))
    emulator_port = int(os.environ["STORAGE_EMULATOR_HOST"].rsplit(":", 1)[1])
    proxy = FaultyProxy(emulator_port, every=7)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{proxy.server_address[1]}")
    try:
        # Text documents found from a range's start (a look back at the line before it) as locally.
        whole = [(type(d).__name__, d.line, getattr(d, "text", None)) for d in documents.iter_documents(str(text))]
        assert read_in_ranges(f"gs://{gcs_bucket}/plain/novel.txt", text.stat().st_size, 1500) == whole
        cfg = config(tmp_path, [f"gs://{gcs_bucket}/plain/*.jsonl"], tiny_tokenizer_path, split_mb=TINY_SPLIT_MB)
        split = data.prepare(cfg)
    finally:
        proxy.shutdown()
    assert {"503", "reset", "cut"} <= set(proxy.faults), proxy.faults
    assert len(splits_of(cfg.output)) >= 3 * len(inputs)
    assert shard_bytes(cfg.output) == shard_bytes(directory)
    assert {k: v for k, v in steady(split).items() if k != "settings"} == \
        {k: v for k, v in steady(manifest).items() if k != "settings"}  # settings name the inputs


def test_a_run_that_fails_on_its_inputs_leaves_nothing_and_a_good_run_into_the_same_output_succeeds(
        tmp_path, corpus, tiny_tokenizer_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    common = [f"--output={out}", f"--tokenizer={tiny_tokenizer_path}", *CLI_SETTINGS]
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "array.jsonl").write_text("\n" + json.dumps([{"text": t} for t in corpus[1][:3]]))
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "fake.jsonl.gz").write_text('{"text": "not gzip"}\n')
    pq.write_table(pa.Table.from_pylist([{"body": t} for t in corpus[1][:3]]), tmp_path / "no_text.parquet")
    pq.write_table(pa.Table.from_pylist([{"text": t} for t in corpus[1][:3]]), tmp_path / "cut.parquet")
    (tmp_path / "cut.parquet").write_bytes((tmp_path / "cut.parquet").read_bytes()[:-100])
    for name, expected in [("empty.jsonl", "is empty"), ("array.jsonl", ":2 is not JSONL: expected one JSON object"),
                           ("binary.txt", "is not text"), ("fake.jsonl.gz", "cannot be read"),
                           ("no_text.parquet", "no column 'text'"), ("cut.parquet", "not a readable Parquet file")]:
        started = time.time()
        failed = forked.run([sys.executable, "data.py", "prepare", f"--input={corpus[0][0]},{tmp_path / name}",
                             *common], cwd=REPO, capture_output=True, text=True)
        assert failed.returncode == 2 and len(failed.stderr.strip().splitlines()) == 1, failed.stderr
        assert f"{tmp_path / name}" in failed.stderr and expected in failed.stderr, failed.stderr
        assert time.time() - started < 30  # before any worker or engine starts
        assert not out.exists() or not list(out.iterdir()), list(out.iterdir())
    # A run that fails in its map tasks (a bad record, found there) leaves nothing either.
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": t} for t in corpus[1][:3]] + [{"txt": "x"}])
    failed = forked.run([sys.executable, "data.py", "prepare", f"--input={bad}", *common], cwd=REPO,
                        capture_output=True, text=True)
    assert failed.returncode == 2 and f"{bad}:4: no string field 'text'" in failed.stderr, failed.stderr
    assert not list(out.iterdir()), list(out.iterdir())
    run_script("data.py", "prepare", "--input=" + ",".join(corpus[0]), *common)
    assert (out / "manifest.json").exists()


def test_command_line_help_is_short_and_bad_flags_are_one_line_with_status_2(tmp_path, tiny_tokenizer_path):
    def run(*args):
        return forked.run([sys.executable, "data.py", *args], cwd=REPO, capture_output=True, text=True)

    shown = run("prepare", "--help")
    assert shown.returncode == 0 and shown.stdout.index("--input") < 60 * 80  # the flags come early
    assert "--ray_address" in shown.stdout and "--num_hosts" not in shown.stdout
    for args, named in [(["--bogus=1"], "bogus"), (["--seq_len=abc"], "--seq_len"),
                        ([f"--input={tmp_path}/none*.jsonl", f"--output={tmp_path}/o", "--tokenizer=t.model"],
                         "--tokenizer"),
                        ([f"--input={tmp_path}/none*.jsonl", f"--output={tmp_path}/o",
                          f"--tokenizer={os.path.join(REPO, 'data.py')}"], "--tokenizer"),
                        ([f"--input={tmp_path}/none*.jsonl", f"--output={tmp_path}/o",
                          f"--tokenizer={tiny_tokenizer_path}"], "--input"),
                        (["--output=x"], "--input")]:
        failed = run("prepare", *args)
        assert failed.returncode == 2, (args, failed.stderr)
        assert len(failed.stderr.strip().splitlines()) == 1 and named in failed.stderr, (args, failed.stderr)
    # The recipe's flags: a bad target, a source matching nothing, targets beside language shares.
    common = [f"--input={tmp_path}", f"--output={tmp_path}/o", f"--tokenizer={tiny_tokenizer_path}"]
    for args, named in [(["--source_tokens=wiki:lots"], "--source_tokens"),
                        (["--source=wiki=none/*.parquet", "--source_tokens=wiki:5B", "--languages=en,fr"],
                         "--source=wiki"),
                        (["--source_tokens=wiki:5B", "--languages=en:0.7,fr:0.3"], "--source_tokens"),
                        (["--source=wiki", "--languages=en,fr"], "--source=wiki")]:
        failed = run("prepare", *common, *args)
        assert failed.returncode == 2, (args, failed.stderr)
        assert len(failed.stderr.strip().splitlines()) == 1 and named in failed.stderr, (args, failed.stderr)
    assert run("merge").returncode == 2


def test_a_models_own_tokenizer_json_prepares_the_corpus_in_its_vocabulary_and_says_code_goes_unwrapped(
        tmp_path, corpus, llama3_tokenizer_dir, capsys):
    """Continued pretraining's data: a Hugging Face tokenizer.json (conftest: Llama-3-style byte-level
    BPE, no <|code|>), documents as <|begin_of_text|> text <|end_of_text|>, code without wrappers."""
    path = os.path.join(llama3_tokenizer_dir, "tokenizer.json")
    tok = open_tokenizer(path)
    code = pathlib.Path(REPO, "sft.py").read_text()
    stack = write_jsonl(tmp_path / "stack.jsonl", [{"text": code, "source": "stack"}])
    manifest = data.prepare(config(tmp_path, [*corpus[0], stack], path, num_cpus=1, num_shards=1,
                                   languages=(("en", None), ("fr", None), ("code", None)), code_sources=("stack",)))
    assert f"--tokenizer={path} has no <|code|>/<|endcode|> tokens" in capsys.readouterr().out
    assert manifest["vocab_size"] == tok.vocab_size and manifest["tokenizer"] == hashlib.sha256(tok.model_bytes).hexdigest()
    records = np.concatenate([shard_records(str(tmp_path / "out"), manifest),
                              shard_records(str(tmp_path / "out"), manifest, "validation")]).ravel()
    starts = np.flatnonzero(records == tok.bos_id)
    whole = [records[a + 1:b - 1].tolist() for a, b in zip(starts, starts[1:]) if records[b - 1] == tok.eos_id]
    decoded = [tok.decode(ids) for ids in whole]
    assert all(ids == tok.encode(text) for ids, text in zip(whole, decoded))
    en, fr = corpus[1], corpus[2]
    prose = [text for text in decoded if text in set(en + fr)]
    assert len(prose) >= len(en + fr) - 2 * len(manifest["shards"]) - 1
    assert [text for text in decoded if text not in set(en + fr)] == [documents.clean_text(code)]
