"""Tests against the GCS emulator reach only the emulator: one gs:// checkpoint round trip (Orbax:
TensorStore writes the arrays, gcsfs the directories) in a process whose every connection and
name lookup is recorded, and none may leave 127.0.0.0/8.

Two guards, because the clients live in two worlds: an audit hook sees what Python code does
(gcsfs, google-auth, google-cloud-storage: `socket.getaddrinfo`, `socket.connect`) and refuses
it; `strace` sees what native code does (TensorStore's curl, a resolver's DNS packets) and runs
where it is installed and may trace (as root; Debian: `apt-get install strace`), else only the
hook guards. A DNS query counts as leaving, whatever the resolver's address: it asks about a
name that is not local.

Without the settings of tests/conftest.py, each guard fails this test: with gcsfs's default
credentials the hook refuses google-auth's probes of 169.254.169.254; without TensorStore's
token the trace shows its DNS lookup of the metadata server; with none, the round trip hangs.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import REPO

ROUND_TRIP = r'''
import ipaddress, json, socket, sys

outside = []


def local(host) -> bool:
    if isinstance(host, bytes):
        host = host.decode()
    if host in (None, "", "localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False  # a name other than localhost
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def guard(event, args):
    if event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex"):
        host = args[0]
    elif event in ("socket.connect", "socket.sendto") and args[0].family in (socket.AF_INET, socket.AF_INET6):
        host = args[1][0]
    else:
        return
    if not local(host):
        outside.append(f"{event} {host}")
        print(f"loopback guard: refused {event} {host}", file=sys.stderr, flush=True)
        raise OSError(f"refused by the loopback guard: {event} {host}")


sys.addaudithook(guard)

import jax
import numpy as np

import checkpoint
from model import ModelConfig, Transformer

uri = sys.argv[1]
model = Transformer(ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16),
                    jax.random.key(0))
checkpoint.save(uri, 7, model, b"tokenizer")
loaded, tokenizer, _ = checkpoint.load(uri)
same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(loaded)))
print(json.dumps({"step": checkpoint.latest_step(uri), "same": same, "tokenizer": tokenizer.decode(),
                  "outside": outside}))
'''

# strace's view of a socket address: IPv4 and IPv6, with the port.
INET = re.compile(r'sin_port=htons\((\d+)\), sin_addr=inet_addr\("([^"]+)"\)'
                  r'|sin6_port=htons\((\d+)\).*?inet_pton\(AF_INET6, "([^"]+)"')


def outside_loopback(trace: str) -> list[str]:
    """The lines of an `strace -e trace=connect,sendto,sendmsg` log that address a host outside
    127.0.0.0/8 (or ::1), or any DNS server."""
    import ipaddress

    bad = []
    for line in trace.splitlines():
        for match in INET.finditer(line):
            port, host = (match[1], match[2]) if match[1] else (match[3], match[4])
            ip = ipaddress.ip_address(host)
            if port == "53" or not (getattr(ip, "ipv4_mapped", None) or ip).is_loopback:
                bad.append(line.strip())
    return bad


def strace_prefix(log: str) -> list[str]:
    """`strace` recording every connect and addressed send of the process and its threads and
    children into `log`, or [] where strace is missing or may not trace here."""
    if not shutil.which("strace"):
        return []
    command = ["strace", "-f", "--seccomp-bpf", "-qq", "-e", "trace=connect,sendto,sendmsg", "-o", log]
    if subprocess.run([*command, "true"], capture_output=True).returncode:
        return []
    return command


def test_a_gcs_checkpoint_round_trip_sends_nothing_outside_the_loopback(gcs_bucket, tmp_path):
    log = str(tmp_path / "connect.log")
    tracer = strace_prefix(log)
    # Its own session, so that a round trip stuck on a refused connection (what the issue saw:
    # a save blocked for minutes) is stopped with its tracer, and the trace says why.
    process = subprocess.Popen([*tracer, sys.executable, "-c", ROUND_TRIP, f"gs://{gcs_bucket}/loopback"],
                               cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        outside = outside_loopback(open(log).read()) if tracer else "(no strace here)"
        pytest.fail(f"the round trip did not end in 180 s; outside the loopback: {outside}\n{err[-3000:]}")
    assert process.returncode == 0, err[-5000:]
    report = json.loads(out.splitlines()[-1])
    assert report == {"step": 7, "same": True, "tokenizer": "tokenizer", "outside": []}
    if tracer:
        trace = open(log).read()
        assert "127.0.0.1" in trace  # the trace saw the emulator's connections: it works
        assert outside_loopback(trace) == []
