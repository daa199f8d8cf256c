"""Fixtures shared by the test files: one real tokenizer and one real tiny training run per test run.

The suite runs on every core (`pytest -n auto --dist loadfile`, the README's command: pytest-xdist,
one worker process per core, each test file on one worker, so a file's module-scoped fixtures are
built once). What the whole run shares (the tokenizer, the tiny run, its Hugging Face export) is
built once for all workers (`built_once`), and JAX's persistent compilation cache is one folder
that every worker and every script a test starts reads and fills.
"""

import contextlib
import fcntl
import glob
import os
import pathlib
import secrets
import shutil
import subprocess
import sys
import tempfile

import pytest

import forked

# The tests' gs:// paths are a local emulator's (the gcs_bucket fixture): no client may ask Google
# anything. By default gcsfs 2026.10 is its ExtendedGcsFileSystem, which on a listing asks
# Google's storage-control endpoint over gRPC whether the bucket is hierarchical, and building
# that client makes google-auth probe the GCE metadata server (169.254.169.254), not caching a
# failure: on a machine without one, a checkpoint save blocked for minutes. And a client without
# credentials looks for them, the metadata server last (TensorStore looks up
# metadata.google.internal). So, for the tests only: the plain gcsfs, no metadata probe, and
# explicit anonymous credentials (gcsfs's "anon", a fixed token for TensorStore;
# google-cloud-storage is anonymous by itself when STORAGE_EMULATOR_HOST is set). The libraries
# read these at import: set here, before any test imports them, and inherited by every process a
# test starts. Real gs:// users keep the defaults (docs/troubleshooting.md says what
# an offline or sandboxed machine sets). tests/test_loopback.py checks that nothing leaves.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
os.environ["NO_GCE_CHECK"] = "true"
os.environ["FSSPEC_GS_TOKEN"] = "anon"
os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] = "emulator"

# Tests run many small training processes with the same programs: share compiled executables
# between them (and with this process) through JAX's persistent compilation cache. Set in pytest's
# main process before it starts its workers, so that they all inherit the one folder.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="julian-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The suite runs on JAX's CPU backend, in this process and the scripts it starts: with libtpu and
# the CUDA plugin installed (requirements-dev.txt) JAX would try both first. The tests that compile
# for a TPU or a GPU do it through topologies, which need neither backend; processes doing so at
# once share libtpu (it takes a lock file otherwise).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# Ray's token authentication, for every node and driver of the tests' clusters (the processes
# the tests start inherit these): `ray start` turns it on when it finds a token but makes none,
# so the run brings its own, never a ~/.ray/auth_token of this machine (a fresh one has none).
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
# No test reaches the Hugging Face Hub: the libraries fail at once on what is not cached.
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_name] = "1"

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_FILES = sorted(glob.glob(os.path.join(REPO, "samples", "*.txt")))
TINY_VOCAB = 4096  # configs/tiny.flags
TINY_STEPS = 150


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: a worker per core this process may use, as long as each has 6 GiB of memory (a
    worker holds JAX, torch and the libraries' imports, and the scripts its tests start)."""
    import psutil

    return max(1, min(len(os.sched_getaffinity(0)), psutil.virtual_memory().total // (6 << 30)))


# The test files, longest first (summed test durations of a run, 2026-12-07), so that no worker
# ends the run alone on a long file: test_bad_input.py first, which builds the shared tiny run,
# beside test_model.py and test_data.py, which need none of it. Files not named come last.
LONGEST_FIRST = ("test_bad_input.py", "test_model.py", "test_train.py", "test_data.py", "test_dpo.py",
                 "test_compile_targets.py", "test_generate.py", "test_evaluate.py", "test_convert.py",
                 "test_model_targets.py", "test_runlog.py", "test_sft.py", "test_budget.py", "test_data_cluster.py",
                 "test_evaluate_fr.py", "test_benchmarks.py", "test_tokenizer.py", "test_cli.py", "test_optim.py",
                 "test_signals.py", "test_loopback.py", "test_docs.py")


def pytest_configure(config) -> None:
    if hasattr(config.option, "loadscopereorder"):  # xdist would hand out the files by number of tests
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@contextlib.contextmanager
def built_once(tmp_path_factory, name: str):
    """Yields (folder, whether to build it) for the test run's one copy of something expensive,
    whatever the number of workers: the first worker that needs it builds it holding a lock, the
    others wait for the lock and then read it. Under xdist the folder is in the run's temporary
    root, which every worker's own folder is in."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        build = not done.exists()
        if build:  # a worker whose build failed left part of it
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
        yield str(folder), build
        if build:
            done.touch()


def run_script(script: str, *args: str, timeout: int = 600, netns: list[str] = ()) -> subprocess.CompletedProcess:
    """Run one of the repo's scripts as a user would (in a network namespace: `netns`'s command
    prefix); fail the test with its output if it fails."""
    result = forked.run([*netns, sys.executable, os.path.join(REPO, script), *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)
    if result.returncode:
        pytest.fail(f"{script} {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory) -> str:
    """A SentencePiece model with the tiny config's vocabulary, trained on the bundled sample."""
    from tokenizer import train_tokenizer

    with built_once(tmp_path_factory, "tokenizer") as (folder, build):
        prefix = os.path.join(folder, "tiny")
        return train_tokenizer(DATA_FILES, prefix, vocab_size=TINY_VOCAB) if build else prefix + ".model"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_tokenizer_path) -> str:
    """Output dir of `train.py --flagfile=configs/tiny.flags` after TINY_STEPS steps on the sample."""
    with built_once(tmp_path_factory, "tiny_run") as (out, build):
        if build:
            run_script("train.py", "--flagfile=configs/tiny.flags", f"--tokenizer={tiny_tokenizer_path}",
                       "--train_data=" + ",".join(DATA_FILES), f"--steps={TINY_STEPS}", f"--output_dir={out}",
                       "--log_every=10")
    return out


@pytest.fixture(scope="session")
def tiny(tiny_run):
    """The tiny run's model, as trained (bf16 activations), and its tokenizer."""
    import checkpoint
    from tokenizer_files import tokenizer_from_bytes

    model, tokenizer_bytes, _ = checkpoint.load(tiny_run)
    return model, tokenizer_from_bytes(tokenizer_bytes)


@pytest.fixture(scope="session")
def gcs_bucket():
    """A bucket on a local gcp-storage-emulator (in memory) for this session; yields its name.

    Sets STORAGE_EMULATOR_HOST (google-cloud-storage) and TENSORSTORE_GCS_HTTP_URL (Orbax's
    TensorStore) to the emulator, and restores them afterwards.
    """
    import socket
    import time

    bucket = "julian-test"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    emulator = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tests", "gcs_emulator.py"), "start", "--host", "127.0.0.1",
         "--port", str(port), "--in-memory", "--default-bucket", bucket],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if emulator.poll() is not None or time.time() > deadline:
                emulator.kill()
                pytest.fail("gcp-storage-emulator did not start")
            time.sleep(0.1)
    url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}
    os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url)
    yield bucket
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    emulator.terminate()
    try:
        emulator.wait(timeout=10)
    except subprocess.TimeoutExpired:  # seen once at the end of a run: it outlived SIGTERM by 10 s
        emulator.kill()
        emulator.wait()


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory, tiny_run) -> str:
    """The tiny run's newest checkpoint exported as a Hugging Face Llama folder (convert.py)."""
    import checkpoint
    import convert
    from tokenizer_files import tokenizer_from_bytes

    with built_once(tmp_path_factory, "tiny_hf") as (out, build):
        if build:
            model, tokenizer_bytes, _ = checkpoint.load(tiny_run)
            convert.export_hf(model, tokenizer_from_bytes(tokenizer_bytes), out)
    return out


# Meta-Llama-3-8B-Instruct's chat template, verbatim.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def write_hf_tokenizer(out: str, specials: list[str], bos: str | None = None, config: dict | None = None,
                       chat_template: str | None = None, vocab_size: int = 1000) -> str:
    """A byte-level BPE (GPT-2 style, as Llama 3's and SmolLM's) trained on the bundled samples by
    the `tokenizers` library in a few seconds, saved as a Hugging Face folder: tokenizer.json (its
    post-processor puts `bos` before a text), and tokenizer_config.json / chat_template.jinja
    when given."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train(DATA_FILES, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    steps = [processors.ByteLevel(trim_offsets=False)]
    if bos:
        steps.append(processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                   special_tokens=[(bos, tokenizer.token_to_id(bos))]))
    tokenizer.post_processor = processors.Sequence(steps)
    os.makedirs(out, exist_ok=True)
    tokenizer.save(os.path.join(out, "tokenizer.json"))
    if config is not None:
        with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", **config}, f, indent=2)
    if chat_template is not None:
        with open(os.path.join(out, "chat_template.jinja"), "w") as f:
            f.write(chat_template)
    return out


@pytest.fixture(scope="session")
def llama3_tokenizer_dir(tmp_path_factory) -> str:
    """A Llama-3-style Hugging Face tokenizer folder: byte-level BPE, <|begin_of_text|> before a
    text, eos <|end_of_text|>, no pad or unk, and Llama 3's chat template (turns end with <|eot_id|>)."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    return write_hf_tokenizer(str(tmp_path_factory.mktemp("llama3_tokenizer")), specials, bos="<|begin_of_text|>",
                              config={"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                                      "model_max_length": 100_000}, chat_template=LLAMA3_TEMPLATE)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ray 2.60 does not keep a cluster on the loopback: it resolves 127.0.0.1 to the machine's own
# address, gcs_server and the raylet listen on every interface, and each head's dashboard process
# probes cloud metadata servers (169.254.169.254). The Ray tests therefore run the nodes and every
# process that talks to them (drivers, probes) in a private network namespace whose only
# interface is lo: no packet of theirs can leave 127.0.0.0/8 (design.md, "Ray 2.60 and the
# network"). The rest of the suite (the GCS emulator, jax.distributed) binds 127.0.0.1 itself.
@pytest.fixture(scope="session")
def netns():
    """A private network namespace (lo only, up) for the session; yields the command prefix that
    runs a command inside it. Skips where the system refuses one (unshare -n needs root)."""
    try:
        holder = subprocess.Popen(["unshare", "-n", "sh", "-c", "ip link set lo up && echo up && exec sleep infinity"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError as e:
        pytest.skip(f"no private network namespace for Ray: {e.filename} is not installed")
    if holder.stdout.readline().strip() != "up":
        reason = holder.communicate()[1].strip().splitlines() or ["refused"]
        pytest.skip(f"no private network namespace for Ray: {reason[-1]}")
    holder.stdout.close()
    holder.stderr.close()
    prefix = ["nsenter", f"--net=/proc/{holder.pid}/ns/net"]
    entered = subprocess.run([*prefix, "true"], capture_output=True, text=True)
    if entered.returncode:
        holder.kill()
        holder.wait()
        pytest.skip(f"no private network namespace for Ray: nsenter: {entered.stderr.strip()}")
    yield prefix
    holder.kill()
    holder.wait()


def start_ray_node(netns: list[str], log: str, *args: str) -> subprocess.Popen:
    """`ray start --block` (the node's processes live as long as this one) in the namespace,
    once its log `log` says it runs."""
    import time

    with open(log, "w") as out:
        node = subprocess.Popen([*netns, "ray", "start", "--block", "--node-ip-address=127.0.0.1",
                                 "--disable-usage-stats", *args], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while "Ray runtime started" not in pathlib.Path(log).read_text():
        if node.poll() is not None or time.time() > deadline:
            stop_ray_node(node)
            pytest.fail(f"ray start {' '.join(args)} did not come up:\n{pathlib.Path(log).read_text()[-3000:]}")
        time.sleep(0.2)
    return node


def stop_ray_node(node: subprocess.Popen) -> None:
    """Stops a node this session started, by its process id (never a machine-wide `ray stop`)."""
    node.terminate()
    try:
        node.wait(timeout=60)
    except subprocess.TimeoutExpired:
        node.kill()
        node.wait()


# A driver on a cluster: its alive nodes, and how many of them ran tasks spread over them.
PROBE = """
import sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
alive = [n for n in ray.nodes() if n["Alive"]]

@ray.remote(scheduling_strategy="SPREAD")
def where():
    time.sleep(0.5)
    return ray.get_runtime_context().get_node_id()

seen, deadline = set(), time.time() + 120
while len(seen) < len(alive) and time.time() < deadline:
    seen |= set(ray.get([where.remote() for _ in range(2 * len(alive))]))
print(len(alive), len(seen))
"""


def ray_nodes_taking_tasks(netns: list[str], address: str) -> list[str]:
    """[alive nodes, nodes that ran a task] of the cluster at `address`, as a driver sees them."""
    probe = subprocess.run([*netns, sys.executable, "-c", PROBE, address], capture_output=True, text=True,
                           timeout=300)
    return probe.stdout.split() or [probe.stderr[-2000:]]


@pytest.fixture(scope="session")
def ray_cluster(netns, tmp_path_factory):
    """A one-node, one-CPU Ray cluster in the session's network namespace; yields (address, head
    process). Stopped at the end by process id."""
    address = f"127.0.0.1:{free_port()}"  # the namespace's ports are all free but Ray's own
    log = str(tmp_path_factory.mktemp("ray") / "head.log")
    head = start_ray_node(netns, log, "--head", f"--port={address.rsplit(':', 1)[1]}", "--num-cpus=1",
                          "--include-dashboard=false")
    yield address, head
    stop_ray_node(head)
