"""Checkpoints: one Orbax step directory per save, committed atomically, local or gs://.

A step directory holds five items:
  params     the model's arrays (an Equinox `Transformer` pytree, fp32 master weights)
  opt_state  the optimizer's state (AdamW moments in --opt_state_dtype, counters)
  meta       JSON: {"step", "data_offset", "rollbacks", "rng"}: where training stands. The batch
             of step s is read at data position s + data_offset (a rollback past bad batches
             raises the offset); "rng" is the raw PRNG key all per-step keys are folded from.
  config     JSON: {"model": ModelConfig fields, "run": the resolved run config}
  tokenizer  the tokenizer's bytes (Tokenizer.model_bytes), so a checkpoint is self-contained

Orbax writes a step into a temporary directory and renames it when every process has finished
(on GCS, a commit marker), so a process killed mid-save leaves nothing `latest_step` picks up:
the next run resumes from the previous complete step. Saves are asynchronous: the arrays are
copied to host memory, then written by a background thread while training goes on.

For inference, `load()` restores only params, config and tokenizer, and `save()` writes only
those (convert.py's imports). `PreemptionGuard` turns a preemption notice into the request for
the emergency checkpoint that train.fit writes at the next step boundary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import sys
import tempfile
import time

import equinox as eqx
import fsspec
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

import hf_llama
from model import ModelConfig, Transformer

# Orbax checks gs:// directories through gcsfs, whose cached listings miss the files TensorStore
# writes beside it: under load a finished save's metadata step now and then failed with
# "Checkpoint directory does not exist" (a stale listing of the step directory). List afresh.
fsspec.config.conf.setdefault("gs", {})["use_listings_cache"] = False

DEFAULT_COMPILATION_CACHE = "~/.cache/julian/jax"
COMPILATION_CACHE_HELP = (
    "JAX's persistent compilation cache (local or gs://, so a pod's hosts share it): a relaunch loads "
    "its compiled programs instead of compiling them. Default: $JAX_COMPILATION_CACHE_DIR if set, "
    f"else {DEFAULT_COMPILATION_CACHE}; '' turns it off. The flag, when given, wins over the variable.")
# Where a run config keeps what an import from a Hugging Face folder read besides weights and
# tokenizer ({"path", "config": its config.json, "generation_config"}), so an export writes them back.
IMPORTED = "imported"
# ModelConfig fields that change how the model runs, not what its weights mean.
EXECUTION_FIELDS = ("dtype", "scan_layers", "remat", "attention", "dropout", "fp32_residual")


def quiet_logging(verbosity_flag_given: bool) -> None:
    """Orbax logs every save step at INFO, which absl shows by default: keep the console to our
    own lines unless the user asked for a --verbosity."""
    if not verbosity_flag_given:
        logging.set_verbosity(logging.WARNING)


def use_compilation_cache(directory: str | None) -> str | None:
    """Turn on JAX's persistent compilation cache in `directory` (None: $JAX_COMPILATION_CACHE_DIR,
    else DEFAULT_COMPILATION_CACHE; "": off) before anything compiles; returns the directory used.

    Every program is cached, however fast it compiled (JAX's default skips those under a second,
    yet evaluation compiles several such programs per run), unless
    $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says otherwise."""
    if directory is None:
        directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or DEFAULT_COMPILATION_CACHE
    if not directory:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    directory = directory if "://" in directory else os.path.abspath(os.path.expanduser(directory))
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", directory)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return directory


def _path(directory: str) -> str:
    return directory if "://" in directory else os.path.abspath(directory)


def _manager(directory: str, max_to_keep: int | None = None, keep_period: int | None = None,
             create: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, keep_period=keep_period, create=create)
    return ocp.CheckpointManager(_path(directory), options=options)


def _exists(directory: str) -> bool:
    return "://" in directory or os.path.isdir(directory)


def _is_hf_folder(directory: str) -> bool:
    """A Hugging Face model folder: its config.json names a model_type (a run's config.json has none)."""
    try:
        with open(os.path.join(directory, "config.json")) as f:
            return "model_type" in json.load(f)
    except (OSError, ValueError):
        return False


def latest_step(directory: str) -> int | None:
    """Newest complete step under `directory`, or None."""
    if not _exists(directory):
        return None
    with _manager(directory, create=False) as manager:
        return manager.latest_step()


def config_mismatch(saved: dict, model_config: ModelConfig) -> str | None:
    """Name the first weight-shaping field where `saved` (a checkpoint's config["model"]) and
    `model_config` differ, as 'field: checkpoint has X, flags say Y'; None when they agree.
    A field the checkpoint predates has its default there."""
    saved = dataclasses.asdict(ModelConfig(**saved))  # a JSON list becomes its tuple
    for field, value in dataclasses.asdict(model_config).items():
        if field not in EXECUTION_FIELDS and saved[field] != value:
            return f"--{'seq_len' if field == 'max_seq_len' else field}: the checkpoint has " \
                   f"{saved[field]!r}, the flags say {value!r}"
    return None


@contextlib.contextmanager
def _reading(directory: str, step: int):
    """Orbax reads a step: a failure becomes `damaged`'s one-line report. When one read of a
    damaged step fails, Orbax's others fail too, and TensorStore's threads print a traceback for
    each, at once and as the process exits: stderr is held in a file meanwhile and passed on
    only when the read succeeds."""
    sys.stderr.flush()
    original, held, failed = os.dup(2), tempfile.TemporaryFile(), False
    os.dup2(held.fileno(), 2)
    try:
        yield
    except Exception as e:  # Orbax and TensorStore raise bare Exceptions for unreadable files
        failed = True
        raise damaged(directory, step, e) from e
    finally:
        if not failed:
            sys.stderr.flush()
            os.dup2(original, 2)
            held.seek(0)
            os.write(2, held.read())
        os.close(original)
        held.close()


def damaged(directory: str, step: int, error: Exception) -> ValueError:
    """The one-line report of a step that Orbax cannot read back (truncated or missing files).
    The process is going down on it: its stderr goes to /dev/null from here on (see _reading;
    cli.error writes the report to the stderr it kept)."""
    sys.stderr.flush()
    sys.stderr = open(os.devnull, "w")
    os.dup2(sys.stderr.fileno(), 2)
    while error.__cause__ is not None:  # TensorStore's own words are at the bottom of the chain
        error = error.__cause__
    cause = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    where = f"{_path(directory).rstrip('/')}/{step}"
    return ValueError(f"checkpoint step {step} in {directory!r} is damaged ({cause[:300]}): expected the "
                      f"files Orbax wrote; move {where} away to use the step before it")


class Checkpointer:
    """Asynchronous saves and restores of the full training state under one directory.

    Every process of a multi-host run makes one and calls it at the same steps (Orbax
    synchronizes them). `keep` most recent steps are kept, plus every multiple of `keep_every`.
    """

    def __init__(self, directory: str, keep: int | None = 3, keep_every: int | None = None):
        self.directory = directory
        self.manager = _manager(directory, keep, keep_every)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, model: Transformer, opt_state, meta: dict, config: dict,
             tokenizer_bytes: bytes) -> None:
        """Start saving step `step`; returns once the arrays are copied off the devices."""
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(model),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave({**meta, "step": step}),
            config=ocp.args.JsonSave(config),
            tokenizer=ocp.args.StandardSave({"model": np.frombuffer(tokenizer_bytes, np.uint8)}),
        ), force=True)

    def wait(self) -> None:
        """Block until every started save is committed."""
        self.manager.wait_until_finished()

    def restore_config(self, step: int) -> dict:
        with _reading(self.directory, step):
            return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def restore(self, step: int, abstract_model, abstract_opt_state) -> tuple[Transformer, object, dict]:
        """(model, opt_state, meta) of `step`, laid out as the abstract trees' shardings say."""
        with _reading(self.directory, step):
            restored = self.manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_model),
                opt_state=ocp.args.StandardRestore(abstract_opt_state),
                meta=ocp.args.JsonRestore(),
            ))
        return restored.params, restored.opt_state, restored.meta

    def close(self) -> None:
        self.manager.close()


def save(directory: str, step: int, model: Transformer, tokenizer_bytes: bytes,
         run_config: dict | None = None) -> None:
    """Save an inference checkpoint (params, config, tokenizer; no optimizer state), e.g. a model
    imported from Hugging Face. Training starts from one with --init_from."""
    config = {"model": dataclasses.asdict(model.config), "run": run_config or {}}
    with _manager(directory) as manager:
        manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(model),
            config=ocp.args.JsonSave(config),
            tokenizer=ocp.args.StandardSave({"model": np.frombuffer(tokenizer_bytes, np.uint8)}),
        ))
        manager.wait_until_finished()


def load(directory: str, step: int | None = None, model_overrides: dict | None = None
         ) -> tuple[Transformer, bytes, dict]:
    """Restore (model, tokenizer bytes, config dict) from the newest (or given) step; a Hugging
    Face Llama folder is imported (load_hf).

    `model_overrides` changes execution-only fields of the saved ModelConfig (dtype, scan_layers,
    remat, attention) without touching the weights.
    """
    step = latest_step(directory) if step is None else step
    if step is None:
        if _is_hf_folder(directory):
            return load_hf(directory, model_overrides)
        raise FileNotFoundError(
            f"no checkpoint in {directory!r}: expected an Orbax step directory written by train.py")
    with _manager(directory, create=False) as manager, _reading(directory, step):
        config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
        model_config = dataclasses.replace(ModelConfig(**config["model"]), **(model_overrides or {}))
        abstract = eqx.filter_eval_shape(Transformer, model_config, jax.random.key(0))
        restored = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract),
            tokenizer=ocp.args.StandardRestore(),
        ))
    return restored.params, np.asarray(restored.tokenizer["model"]).tobytes(), config


def load_hf(directory: str, model_overrides: dict | None = None) -> tuple[Transformer, bytes, dict]:
    """`load` of a Hugging Face Llama folder: imported on the way in (hf_llama.py's import, said in
    one line on stderr), its config.json and generation_config.json kept in the run config."""
    model, tokenizer_bytes, kept = _import_hf(os.path.abspath(directory))
    config = dataclasses.replace(model.config, **(model_overrides or {}))
    like = eqx.filter_eval_shape(Transformer, config, jax.random.key(0))
    model = jax.tree.unflatten(jax.tree.structure(like), jax.tree.leaves(model))
    return model, tokenizer_bytes, {"model": dataclasses.asdict(config), "run": kept}


@functools.lru_cache(maxsize=1)
def _import_hf(directory: str) -> tuple[Transformer, bytes, dict]:
    """Imported once per process: a run reads its --init_from for its shape and tokenizer, then
    for its parameters (and dpo.py for its reference)."""
    started = time.perf_counter()
    model, tokenizer, imported = hf_llama.import_hf(directory)
    print(f"imported Hugging Face folder {directory} ({hf_llama.describe(model.config)}) in "
          f"{time.perf_counter() - started:.1f} s; `python convert.py --to=julian --hf={directory} "
          "--out=DIR` does it once for all runs", file=sys.stderr)
    return model, tokenizer.model_bytes, {IMPORTED: imported}


def imported_of(config: dict) -> dict | None:
    """The IMPORTED entry of a checkpoint's config: an imported checkpoint's run config, or (passed
    on by train.py, sft.py and dpo.py) that of a run started from one."""
    return (config.get("run") or {}).get(IMPORTED) or config.get(IMPORTED)


def load_config(directory: str) -> tuple[dict, bytes]:
    """(config dict, tokenizer bytes) of the newest step, without its parameters; of a Hugging
    Face folder, as `load` imports it."""
    step = latest_step(directory)
    if step is None:
        _, tokenizer_bytes, config = load(directory)
        return config, tokenizer_bytes
    with _manager(directory, create=False) as manager, _reading(directory, step):
        restored = manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore(), tokenizer=ocp.args.StandardRestore()))
    return restored.config, np.asarray(restored.tokenizer["model"]).tobytes()


class PreemptionGuard:
    """Turns SIGTERM (a preemption notice) and SIGINT (Ctrl-C) into a stop request at the next
    step boundary; a second Ctrl-C interrupts at once.

    Once the run's last checkpoint is committed (`saved_all`), the work is done: both signals
    are ignored until the process exits (SIG_IGN, which Python keeps through its shutdown, unlike
    a handler of its own), so one that lands during cleanup ends the script with status 0, not -15.
    """

    def __init__(self):
        self.requested, self.finished = False, False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def saved_all(self) -> None:
        for sig in self.previous:
            signal.signal(sig, signal.SIG_IGN)
        self.finished = True

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def close(self) -> None:
        if self.finished:  # the process only cleans up and exits from here on
            return
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
