"""Checkpoints: one Orbax step directory per save, committed atomically.

A step directory holds three items:
  params     the model's arrays (an Equinox `Transformer` pytree, fp32)
  config     JSON: {"model": ModelConfig fields, "run": the resolved run config}
  tokenizer  the SentencePiece model's serialized bytes, so a checkpoint is self-contained

Orbax writes into a temporary directory and renames it on success, so a crash mid-save leaves
nothing that `latest_step` would pick up. (The training issue adds optimizer state, data
position, async saves and emergency saves on preemption.)
"""

from __future__ import annotations

import dataclasses
import os

import equinox as eqx
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from model import ModelConfig, Transformer


def quiet_logging(verbosity_flag_given: bool) -> None:
    """Orbax logs every save step at INFO, which absl shows by default: keep the console to our
    own lines unless the user asked for a --verbosity."""
    if not verbosity_flag_given:
        logging.set_verbosity(logging.WARNING)


def _manager(directory: str, max_to_keep: int | None = None) -> ocp.CheckpointManager:
    directory = directory if "://" in directory else os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(directory, options=options)


def save(directory: str, step: int, model: Transformer, tokenizer_bytes: bytes,
         run_config: dict | None = None, max_to_keep: int | None = 3) -> None:
    """Save `model` as step `step` under `directory` and wait until it is committed."""
    config = {"model": dataclasses.asdict(model.config), "run": run_config or {}}
    with _manager(directory, max_to_keep) as manager:
        manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(model),
            config=ocp.args.JsonSave(config),
            tokenizer=ocp.args.StandardSave({"model": np.frombuffer(tokenizer_bytes, np.uint8)}),
        ))
        manager.wait_until_finished()


def latest_step(directory: str) -> int | None:
    if "://" not in directory and not os.path.isdir(directory):
        return None
    with _manager(directory) as manager:
        return manager.latest_step()


def load(directory: str, step: int | None = None, model_overrides: dict | None = None
         ) -> tuple[Transformer, bytes, dict]:
    """Restore (model, tokenizer bytes, config dict) from the newest (or given) step.

    `model_overrides` changes execution-only fields of the saved ModelConfig (dtype, scan_layers,
    remat, attention) without touching the weights.
    """
    step = latest_step(directory) if step is None else step
    if step is None:
        raise FileNotFoundError(
            f"no checkpoint in {directory!r}: expected an Orbax step directory written by train.py")
    with _manager(directory) as manager:
        config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
        model_config = dataclasses.replace(ModelConfig(**config["model"]), **(model_overrides or {}))
        abstract = eqx.filter_eval_shape(Transformer, model_config, jax.random.key(0))
        restored = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract),
            tokenizer=ocp.args.StandardRestore(),
        ))
    return restored.params, np.asarray(restored.tokenizer["model"]).tobytes(), config
