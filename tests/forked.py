"""`subprocess.run` and `subprocess.Popen` for `python SCRIPT.py ARGS`, without paying the
libraries' imports each time.

Every script of the repo spends its first 3-6 s of CPU importing the same libraries (JAX, Equinox,
Optax, Orbax, lm-eval and what they pull in), and the suite starts a few hundred of them: that was
a third of its time. A server process (this file, run as a script: one per pytest worker, started
on first use) imports those libraries once and never initializes a JAX backend; each run is a
child forked from it. The child is a real process: its own pid, exit status and signal handling,
its standard streams (the caller's pipes or files, passed over a Unix socket), working directory,
environment and argv. It runs the script as `__main__` the way `python SCRIPT.py` does (runpy; the
script's folder first on sys.path) and exits through the interpreter's own shutdown, so atexit
handlers and uncaught tracebacks behave as usual. Our own modules are imported fresh by every
child: only third-party code is shared.

What a fork cannot give, the caller gets from a real `python` instead (the same call falls back to
`subprocess`): a command that is not `python SCRIPT.py ...` (`-c`, `-m`, `-X`, a `netns` prefix),
and an environment that changes a variable the preloaded libraries read at import (JAX_*, HF_*,
...). Variables read later (XLA_FLAGS, read when the child's JAX makes its backend, the test
hooks JULIAN_*) may differ. The children share the server's hash seed.
"""

from __future__ import annotations

import atexit
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading

# What the scripts import, found by diffing sys.modules after a run of each (tensorboardX brings torch;
# lm-eval brings datasets and transformers' tokenizers).
PRELOADED = ("jax", "jax.numpy", "equinox", "optax", "orbax.checkpoint", "numpy", "absl.app", "absl.flags",
             "sentencepiece", "tokenizers", "jaxtyping", "safetensors.numpy", "lm_eval.evaluator", "lm_eval.api.model",
             "tensorboardX", "matplotlib.pyplot", "scipy.stats", "pytablewriter", "google_crc32c", "gcsfs",
             "google.cloud.storage")
# Read by those libraries when they are imported: a child must see what the server saw.
IMPORT_TIME_PREFIXES = ("JAX_", "JAXTYPING", "TF_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "DATASETS_", "TORCH",
                        "PYTHON", "OMP_", "MKL_", "LD_", "PATH")
# Set by a library for itself as it runs, not read at import: torch writes its compiler's cache
# folder into the environment the first time a test's transformers model runs.
SET_AT_RUN_TIME = ("TORCHINDUCTOR_CACHE_DIR",)


def _import_time_env(env) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_PREFIXES) and k not in SET_AT_RUN_TIME}


class _Server:
    """This worker's server: its process and socket path. Stopped (with any child it still runs)
    when the worker exits."""

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="julian-forked-")
        self.path = os.path.join(self.folder, "socket")
        self.env = _import_time_env(os.environ)
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), self.path],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        ready = self.process.stdout.readline()
        if not ready.startswith("ready "):
            self.process.kill()
            self.process.wait()
            raise RuntimeError(f"tests/forked.py: the server did not start (it said {ready.strip()!r})")
        # What the imports set for themselves where it was unset (JAX sets TF_CPP_MIN_LOG_LEVEL).
        self.imported_env = json.loads(ready.removeprefix("ready "))
        atexit.register(self.stop)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self.process.stdout.close()
        for name in os.listdir(self.folder):
            os.unlink(os.path.join(self.folder, name))
        os.rmdir(self.folder)


_server: _Server | None = None
_server_lock = threading.Lock()


def _forkable(args, env) -> str | None:
    """The script of `args` when the server can run it: `python SCRIPT.py ARGS`, in an
    environment that agrees with the server's on what the libraries read at import."""
    if isinstance(args, (str, bytes)) or len(args) < 2 or args[0] != sys.executable:
        return None
    script = os.fspath(args[1])
    if not script.endswith(".py"):
        return None
    wanted = _import_time_env(os.environ if env is None else env)
    if _server is None:  # it will start with this process's environment
        return script if wanted == _import_time_env(os.environ) else None
    # A variable the libraries set by default when it is unset reads the same either way.
    for name in wanted.keys() | _server.env.keys() | _server.imported_env.keys():
        if wanted.get(name) not in (_server.env.get(name), _server.imported_env.get(name)):
            return None
    return script


class Popen(subprocess.Popen):
    """subprocess.Popen, whose child is forked by this worker's server when `_forkable` allows.
    Pipes, communicate(), timeouts and text mode are subprocess's own; only starting the child and
    learning its exit status differ (the server is its parent and reports its status on the
    connection that asked for it)."""

    def __init__(self, args, *rest, **kwargs):
        self._connection = None
        session = kwargs.get("start_new_session") or kwargs.get("process_group") is not None
        self._script = None if session else _forkable(args, kwargs.get("env"))
        super().__init__(args, *rest, **kwargs)

    def _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo,
                       creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite, *rest):
        if self._script is None or shell or preexec_fn is not None or pass_fds:
            return super()._execute_child(args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo,
                                          creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread,
                                          errwrite, *rest)
        global _server
        with _server_lock:
            if _server is None:
                _server = _Server()
        request = {"argv": [os.fsdecode(a) for a in args[1:]], "cwd": os.fsdecode(cwd or os.getcwd()),
                   "env": {os.fsdecode(k): os.fsdecode(v) for k, v in (os.environ if env is None else env).items()}}
        # -1: the stream is not redirected, so the child gets this process's own.
        fds = [fd if fd != -1 else default for fd, default in ((p2cread, 0), (c2pwrite, 1), (errwrite, 2))]
        self._connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._connection.connect(_server.path)
        socket.send_fds(self._connection, [json.dumps(request).encode() + b"\n"], fds)
        for fd, ours in ((p2cread, p2cwrite), (c2pwrite, c2pread), (errwrite, errread)):
            if fd != -1 and ours != -1:  # the child holds its end now
                os.close(fd)
        self.pid = int(self._read_line(None))
        self._child_created = True

    def _read_line(self, timeout: float | None) -> str | None:
        """The server's next line on this connection; None if none came within `timeout`."""
        self._connection.settimeout(timeout)
        data = b""
        try:
            while not data.endswith(b"\n"):
                chunk = self._connection.recv(64)
                if not chunk:
                    raise RuntimeError(f"tests/forked.py: the server went away while running pid {self.pid}")
                data += chunk
        except (TimeoutError, BlockingIOError):
            if data:
                raise
            return None
        return data.decode().strip()

    def _finished(self, status: str) -> None:
        self.returncode = os.waitstatus_to_exitcode(int(status))
        self._connection.close()

    def _internal_poll(self, *args, **kwargs):
        if self._connection is None:
            return super()._internal_poll(*args, **kwargs)
        if self.returncode is None:
            status = self._read_line(0)
            if status is not None:
                self._finished(status)
        return self.returncode

    def _wait(self, timeout):
        if self._connection is None:
            return super()._wait(timeout)
        if self.returncode is None:
            status = self._read_line(timeout)
            if status is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._finished(status)
        return self.returncode


def run(args, *, input=None, capture_output=False, timeout=None, check=False, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run, through this file's Popen."""
    if capture_output:
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    with Popen(args, **kwargs) as process:
        try:
            stdout, stderr = process.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        except BaseException:
            process.kill()
            raise
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    if check:
        result.check_returncode()
    return result


def _serve(path: str):
    """The server's loop: fork a child per connection, report each child's wait status on its
    connection when it ends. Returns only in a child: (request, its three stream fds)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    children: dict[int, socket.socket] = {}

    def stop(*_):
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    print("ready", json.dumps(_import_time_env(os.environ)), flush=True)
    while True:
        readable, _, _ = select.select([listener], [], [], 0.05)
        if readable:
            connection, _ = listener.accept()
            message, fds, _, _ = socket.recv_fds(connection, 1 << 16, 3)
            while not message.endswith(b"\n"):
                message += connection.recv(1 << 16)
            pid = os.fork()
            if pid == 0:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                listener.close()
                connection.close()
                for other in children.values():
                    other.close()
                return json.loads(message), fds
            for fd in fds:
                os.close(fd)
            connection.sendall(f"{pid}\n".encode())
            children[pid] = connection
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            connection = children.pop(pid)
            try:
                connection.sendall(f"{status}\n".encode())
            except OSError:  # the caller gave up on it
                pass
            connection.close()


def _become(request: dict, fds: list[int]) -> str:
    """In the child: take on the caller's streams, directory, environment and argv, as
    `python SCRIPT.py ARGS` would have them."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in set(fds) - {0, 1, 2}:
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.open(0, "rb", closefd=False), errors="strict")
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(io.open(1, "wb", buffering=0 if unbuffered else -1, closefd=False),
                                                   line_buffering=os.isatty(1), write_through=unbuffered)
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(io.open(2, "wb", buffering=0 if unbuffered else -1, closefd=False),
                                                   errors="backslashreplace", line_buffering=True,
                                                   write_through=unbuffered)
    script = os.path.abspath(request["argv"][0])
    sys.argv = [request["argv"][0], *request["argv"][1:]]
    sys.path[0] = os.path.dirname(script)
    return script


if __name__ == "__main__":
    import gc
    import importlib
    import runpy

    for _name in PRELOADED:
        importlib.import_module(_name)
    # Out of the collector's sight: the children's collections and the interpreter's shutdown
    # would otherwise touch every object the server imported, copying each page that holds one
    # (2.3 s for a child that fails on its flags, against 0.9).
    gc.freeze()
    _script = _become(*_serve(sys.argv[1]))
    runpy.run_path(_script, run_name="__main__")
