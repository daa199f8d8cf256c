"""Where a run starts: the newest checkpoint in its --output_dir, continued exactly (refused when
the settings changed so that it would not be), else --init_from's parameters with a fresh
optimizer, else a fresh initialization. Starting from --init_from, the model's shape and
tokenizer are the checkpoint's (init_from_model, init_tokenizer: the flags given must agree).

A resumed run sees exactly the batches an uninterrupted run would (the batch of step s is a pure
function of the seed and s + data_offset; see stream.py) and the same optimizer state and
dropout keys, so on CPU its losses are bit-for-bit an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import optax
from jax.sharding import Mesh

import checkpoint
from model import ModelConfig
from parallel import shardings
from train_step import TrainState, abstract_state, init_state
from tokenizer import Tokenizer
from tokenizer_files import open_tokenizer, tokenizer_from_bytes


# A resumed run's TrainConfig may differ from the checkpoint's in these only: --grad_accum splits
# the same global batch differently; --steps (checked apart) may grow.
RESUMABLE_CHANGES = ("grad_accum", "steps")
# Settings of sft.py's and dpo.py's data (train.resolved_config's extra sections) that follow from others.
DERIVED = ("epochs", "files", "rows", "pairs", "supervised_tokens_per_epoch")


def check_resume(saved: dict, now: dict, where: str) -> str | None:
    """Raise, naming every flag that differs, when resuming the run whose resolved_config was
    `saved` with `now` would not continue it exactly (batch size, seed, schedule, optimizer,
    data: the batch of step s and its update are functions of these); the model's shape is
    start_state's to check. Return a note when --steps grew (allowed: the cosine stretches over
    the new length from the resumed step on), else None."""
    def flatten(config: dict) -> dict:
        out = {f"--{k}": v for k, v in config.get("train", {}).items() if k not in RESUMABLE_CHANGES}
        for section, value in config.items():
            if section in ("model", "train", "run"):
                continue
            items = value.items() if isinstance(value, dict) else [(section, value)]
            out.update({f"--{k}": v for k, v in items if k not in DERIVED})
            if isinstance(value, dict):  # the data the settings produced: changed files change them
                out.update({f"data ({k})": value[k] for k in DERIVED if k in value and k != "epochs"})
        return out

    before, after = flatten(saved), flatten(json.loads(json.dumps(now)))  # as saved: tuples become lists
    short = lambda v: r if len(r := repr(v)) <= 60 else r[:57] + "..."
    changed = [f"{k} {short(before[k])} -> {short(after[k])}" for k in after if k in before and before[k] != after[k]]
    steps_before, steps_after = saved.get("train", {}).get("steps"), now["train"]["steps"]
    if steps_before is not None and steps_after < steps_before:
        changed.append(f"--steps {steps_before} -> {steps_after} (a shorter schedule)")
    if changed:
        raise ValueError(f"{where} holds a run with other settings, which a resume would not continue exactly: "
                         f"{'; '.join(changed)}. Use the checkpoint's flags, another --output_dir, or "
                         f"--init_from to start a new run from its parameters")
    if steps_before is not None and steps_after > steps_before:
        return (f"--steps {steps_before} -> {steps_after}: the run is extended, its cosine schedule "
                f"now decays over {steps_after} steps")
    return None


def steps_left(ckpt: checkpoint.Checkpointer, steps: int, run_config: dict, title: str, primary: bool) -> bool:
    """False, said and with `ckpt` closed, when its directory already holds the run's last step:
    a rerun of a finished run trains nothing and logs no resume. Otherwise True, once
    check_resume has accepted the newest checkpoint's settings (its note said, if any)."""
    finished = ckpt.latest_step()
    if finished is not None and finished >= steps:
        ckpt.close()
        if primary:
            print(f"{title}: {ckpt.directory} already holds step {finished} of {steps}: nothing "
                  "to train (another --output_dir, or an empty one, starts afresh)")
        return False
    if finished is not None:
        extended = check_resume(ckpt.restore_config(finished), run_config, f"--output_dir={ckpt.directory}")
        if extended and primary:
            print(f"{title}: {extended}")
    return True


def start_state(model_config: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                init_from: str | None, seed: int, ckpt: checkpoint.Checkpointer) -> tuple[TrainState, dict, str]:
    """(state, meta, how) from the newest checkpoint in `ckpt`'s directory (--output_dir), else
    --init_from's parameters with a fresh optimizer, else a fresh initialization."""
    abstract = abstract_state(model_config, optimizer, mesh)
    latest = ckpt.latest_step()
    if latest is not None:
        mismatch = checkpoint.config_mismatch(ckpt.restore_config(latest)["model"], model_config)
        if mismatch:
            raise ValueError(f"--output_dir={ckpt.directory} holds step {latest} of a different model "
                             f"({mismatch}): use another --output_dir, or --init_from to start from it")
        model, opt_state, meta = ckpt.restore(latest, abstract.model, abstract.opt_state)
        return TrainState(model, opt_state), meta, f"resumed from step {latest} in {ckpt.directory}"
    key = jax.random.key(seed)
    meta = {"step": 0, "data_offset": 0, "rollbacks": 0,
            "rng": np.asarray(jax.random.key_data(key)).tolist()}
    if init_from:
        # This run's execution settings (dtype, remat, ...) may differ from the checkpoint's.
        saved = checkpoint.load(init_from, model_overrides={
            name: getattr(model_config, name) for name in checkpoint.EXECUTION_FIELDS})
        mismatch = checkpoint.config_mismatch(saved[2]["model"], model_config)
        if mismatch:
            raise ValueError(f"--init_from={init_from} holds a different model ({mismatch})")
        model = jax.device_put(saved[0], shardings(abstract.model))
        opt_state = jax.jit(optimizer.init, out_shardings=shardings(abstract.opt_state))(model)
        return TrainState(model, opt_state), meta, f"parameters from {init_from}"
    init = jax.jit(lambda k: init_state(model_config, optimizer, k), out_shardings=shardings(abstract))
    return init(key), meta, "initialized from scratch"


# --- Starting from another model (--init_from) ------------------------------------------------

# Model flags (train.py's) and the ModelConfig fields they set.
MODEL_FLAGS = {"vocab_size": "vocab_size", "d_model": "d_model", "n_layers": "n_layers", "n_heads": "n_heads",
               "n_kv_heads": "n_kv_heads", "tie_embeddings": "tie_embeddings", "d_ff": "d_ff",
               "seq_len": "max_seq_len", "rope_theta": "rope_theta", "rope_scaling": "rope_scaling",
               "norm_eps": "norm_eps"}


def init_from_model(init_from: str, from_flags: ModelConfig, given: set[str]) -> tuple[ModelConfig, bytes, dict]:
    """(model config, tokenizer bytes, config dict) of --init_from (a checkpoint, or a Hugging Face
    folder it imports): its weights' shape with this run's execution settings. A model flag given
    on the command line (`given`) must agree with it."""
    saved, tokenizer_bytes = checkpoint.load_config(init_from)
    execution = {name: getattr(from_flags, name) for name in checkpoint.EXECUTION_FIELDS}
    model_config = dataclasses.replace(ModelConfig(**saved["model"]), **execution)
    # --seq_len is the rows' length here (train.open_data's seq_len): at most the context, which stays.
    stated = dataclasses.replace(model_config, **{MODEL_FLAGS[f]: getattr(from_flags, MODEL_FLAGS[f])
                                                  for f in given if f in MODEL_FLAGS and f != "seq_len"})
    if "seq_len" in given and from_flags.max_seq_len > model_config.max_seq_len:
        raise ValueError(f"--seq_len={from_flags.max_seq_len} exceeds the context of --init_from={init_from} "
                         f"({model_config.max_seq_len} tokens)")
    mismatch = checkpoint.config_mismatch(dataclasses.asdict(model_config), stated)
    if mismatch:
        raise ValueError(f"--init_from={init_from} holds a different model ({mismatch}): drop the flag, "
                         "the model's shape comes from --init_from")
    return model_config, tokenizer_bytes, saved


def init_tokenizer(path: str | None, init_from: str, tokenizer_bytes: bytes) -> Tokenizer:
    """--init_from's tokenizer, the one its embeddings were trained with; --tokenizer, when
    given, must be the same."""
    tokenizer = tokenizer_from_bytes(tokenizer_bytes)
    if path:
        try:
            given = open_tokenizer(path)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"--tokenizer: {e}") from None
        if given.model_bytes != tokenizer_bytes:
            raise ValueError(f"--tokenizer={path} ({given.vocab_size} pieces) is not the tokenizer of "
                             f"--init_from={init_from} ({tokenizer.vocab_size} pieces): expected the same one, "
                             "or no --tokenizer (the checkpoint's is used)")
    return tokenizer
