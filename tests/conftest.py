"""Fixtures shared by the test files: one real tokenizer and one real tiny training run per session."""

import glob
import os
import subprocess
import sys
import tempfile

import pytest

# Tests run many small training processes with the same programs: share compiled executables
# between them (and with this process) through JAX's persistent compilation cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="julian-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The suite runs on JAX's CPU backend, in this process and the scripts it starts: with libtpu and
# the CUDA plugin installed (requirements-dev.txt) JAX would try both first. The tests that compile
# for a TPU or a GPU do it through topologies, which need neither backend; processes doing so at
# once share libtpu (it takes a lock file otherwise).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# `ray start --head` turns token authentication on: every node and driver of the session's Ray
# cluster must expect it, and Ray reads this when it is first imported.
os.environ["RAY_AUTH_MODE"] = "token"

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_FILES = sorted(glob.glob(os.path.join(REPO, "samples", "*.txt")))
TINY_VOCAB = 4096  # configs/tiny.flags
TINY_STEPS = 150


def run_script(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run one of the repo's scripts as a user would; fail the test with its output if it fails."""
    result = subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=REPO,
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode:
        pytest.fail(f"{script} {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory) -> str:
    """A SentencePiece model with the tiny config's vocabulary, trained on the bundled sample."""
    from tokenizer import train_tokenizer

    prefix = str(tmp_path_factory.mktemp("tokenizer") / "tiny")
    return train_tokenizer(DATA_FILES, prefix, vocab_size=TINY_VOCAB)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_tokenizer_path) -> str:
    """Output dir of `train.py --flagfile=configs/tiny.flags` after TINY_STEPS steps on the sample."""
    out = str(tmp_path_factory.mktemp("tiny_run"))
    run_script("train.py", "--flagfile=configs/tiny.flags", f"--tokenizer={tiny_tokenizer_path}",
               "--train_data=" + ",".join(DATA_FILES), f"--steps={TINY_STEPS}", f"--output_dir={out}",
               "--log_every=10")
    return out


@pytest.fixture(scope="session")
def tiny(tiny_run):
    """The tiny run's model, as trained (bf16 activations), and its tokenizer."""
    import checkpoint
    from tokenizer import Tokenizer

    model, tokenizer_bytes, _ = checkpoint.load(tiny_run)
    return model, Tokenizer.from_bytes(tokenizer_bytes)


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
    emulator.wait(timeout=10)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory, tiny_run) -> str:
    """The tiny run's newest checkpoint exported as a Hugging Face Llama folder (convert.py)."""
    import checkpoint
    import convert
    from tokenizer import Tokenizer

    out = str(tmp_path_factory.mktemp("tiny_hf"))
    model, tokenizer_bytes, _ = checkpoint.load(tiny_run)
    convert.export_hf(model, Tokenizer.from_bytes(tokenizer_bytes), out)
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ray 2.60 does not keep a multi-node cluster on the loopback: --node-ip-address=127.0.0.1 is
# replaced by the machine's address (services.resolve_ip_for_localhost) and gcs_server, raylet
# and the dashboard agent listen on all interfaces ("::"). RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# (meant for macOS and Windows) does keep a head and its drivers on 127.0.0.1 only (checked with
# psutil's listening sockets), but then `ray start --address` refuses to add a node, and these
# tests add one (test_data.py, tests/test_data_cluster.py). Run the tests on a host whose
# firewall closes Ray's ports; the cluster's token authentication (RAY_AUTH_MODE) still applies.
def start_ray_node(*args: str) -> subprocess.Popen:
    """`ray start --block` (the node's processes live as long as this one) on 127.0.0.1."""
    return subprocess.Popen(["ray", "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                             *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_ray_node(node: subprocess.Popen) -> None:
    """Stops a node this session started, by its process id (never a machine-wide `ray stop`)."""
    node.terminate()
    try:
        node.wait(timeout=60)
    except subprocess.TimeoutExpired:
        node.kill()
        node.wait()


@pytest.fixture(scope="session")
def ray_cluster():
    """A one-node, one-CPU Ray cluster on 127.0.0.1 shared by the session, this process connected
    to it as a driver; yields (address, head process). Stopped at the end by process id."""
    import time

    import ray

    if ray.is_initialized():  # a local Ray some earlier test started in this process
        ray.shutdown()

    address = f"127.0.0.1:{free_port()}"
    head = start_ray_node("--head", f"--port={address.rsplit(':', 1)[1]}", "--num-cpus=1",
                          "--include-dashboard=false")
    deadline = time.time() + 120
    while True:
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=False)
            break
        except (ConnectionError, RuntimeError):
            if head.poll() is not None or time.time() > deadline:
                stop_ray_node(head)
                pytest.fail(f"ray start --head at {address} did not come up")
            time.sleep(0.5)
    yield address, head
    ray.shutdown()
    stop_ray_node(head)
