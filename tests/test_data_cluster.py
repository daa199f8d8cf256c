"""scripts/tpu.sh ray-start / ray-stop for real: the "workers" are shells on this machine
(JULIAN_SSH) in the session's private network namespace, the cluster is a real two-node Ray,
data.py prepare runs on it (in the namespace too), and ray-stop stops exactly its processes while
another Ray cluster (the session's) keeps running."""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import psutil
import pytest

from conftest import REPO, free_port, ray_nodes_taking_tasks, run_script
from test_data import CLI_SETTINGS, TINY_SPLIT_MB, fixture_documents, write_jsonl


def subprocess_run(command: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def session_processes(leaders: list[int]) -> list[psutil.Process]:
    """Every process of the sessions these `ray start --block` processes lead (tpu.sh runs each
    node under setsid)."""
    out = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) in leaders:
                out.append(process)
        except (OSError, psutil.Error):
            continue
    return out


@pytest.mark.slow
def test_tpu_script_starts_a_two_node_ray_cluster_prepare_uses_and_stops_only_its_processes(
        tmp_path, tiny_tokenizer_path, ray_cluster, netns, monkeypatch):
    # `$JULIAN_SSH WORKER COMMAND`: a local shell for every worker, each with a home of its own
    # that holds no Ray token yet, as on a fresh slice.
    worker = tmp_path / "local-worker"
    worker.write_text(f'#!/usr/bin/env bash\nHOME={tmp_path}/home-$1 exec {" ".join(netns)} bash -c "$2"\n')
    worker.chmod(0o755)
    port = free_port()
    temp = tempfile.mkdtemp(prefix="jr", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    # Without the run's Ray token: tpu.sh makes the cluster's.
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"},
           "JULIAN_SSH": str(worker), "JULIAN_IPS": "127.0.0.1 127.0.0.1",
           "JULIAN_RAY_PORT": str(port), "JULIAN_RAY_ARGS": f"--num-cpus=1 --temp-dir={temp}",
           "JULIAN_RAY_HEAD_ARGS": f"--include-dashboard=false --ray-client-server-port={free_port()}",
           "JULIAN_RAY_DIR": str(tmp_path / "ray"), "JULIAN_REMOTE_DIR": REPO,
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    script = [os.path.join(REPO, "scripts", "tpu.sh"), "my-v4-32", "us-central2-b"]
    head = psutil.Process(ray_cluster[1].pid)
    others = [head, *head.children(recursive=True)]  # another cluster on this machine
    docs = {name: fixture_documents(f"{name}.txt") for name in ("en_bronte", "fr_verne")}
    inputs = [write_jsonl(tmp_path / f"{name}.jsonl", [{"text": t} for t in texts]) for name, texts in docs.items()]
    ours: list = []
    try:
        started = subprocess_run([*script, "ray-start"], env)
        assert started.returncode == 0, started.stdout + started.stderr
        # Worker 0 made the cluster's token and worker 1 got it; drivers here need it too.
        tokens = [tmp_path / f"home-{w}" / ".ray" / "auth_token" for w in (0, 1)]
        assert tokens[0].read_text() == tokens[1].read_text() and len(tokens[0].read_text()) == 64
        assert [t.stat().st_mode & 0o777 for t in tokens] == [0o600, 0o600]
        monkeypatch.setenv("RAY_AUTH_TOKEN", tokens[0].read_text())
        leaders = [int((tmp_path / "ray" / f"node-{w}.pid").read_text()) for w in (0, 1)]
        ours = session_processes(leaders)
        names = [p.name() for p in ours]
        assert names.count("raylet") == 2 and names.count("gcs_server") == 1, names
        assert ray_nodes_taking_tasks(netns, f"127.0.0.1:{port}") == ["2", "2"]  # joined, and both take tasks
        out = tmp_path / "out"
        run_script("data.py", "prepare", "--input=" + ",".join(inputs), f"--output={out}",
                   f"--tokenizer={tiny_tokenizer_path}", f"--ray_address=127.0.0.1:{port}",
                   f"--split_mb={TINY_SPLIT_MB}", *CLI_SETTINGS, netns=netns)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["documents"]["read"] == sum(map(len, docs.values()))
        ours = session_processes(leaders)  # with the workers that ran the tasks
    finally:
        stopped = subprocess_run([*script, "ray-stop"], env)
    assert stopped.returncode == 0 and stopped.stdout.count("Ray node stopped") == 2, stopped.stdout + stopped.stderr
    assert ours and not [p for p in ours if p.is_running()]
    assert all(p.is_running() for p in others), "ray-stop touched another Ray cluster"
    assert not list((tmp_path / "ray").glob("*.pid"))
    shutil.rmtree(temp, ignore_errors=True)
