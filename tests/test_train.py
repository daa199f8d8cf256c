"""train.py: the optimizer, the jitted step, the data order, the CLI and what a run leaves behind."""

import dataclasses
import json
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoint
from conftest import DATA_FILES, TINY_STEPS, run_script
from data import TokenRecords
from model import ModelConfig, num_params
from tokenizer import Tokenizer
from train import (TrainConfig, abstract_state, init_state, learning_rate_schedule, make_mesh,
                   make_optimizer, make_train_step, shardings)

TINY = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=2, d_ff=128, max_seq_len=32,
                   dtype="float32")


def test_tiny_run_loss_falls_below_the_unigram_entropy_of_its_data(tiny_run, tiny_tokenizer_path):
    # A model that ignores context can at best reach the entropy of the token frequencies; going
    # well below it means the model uses context. The bar is computed from the data, not chosen.
    tokenizer = Tokenizer.load(tiny_tokenizer_path)
    records = TokenRecords(DATA_FILES, tokenizer, 128, seed=0)
    counts = np.bincount(records.records.ravel(), minlength=tokenizer.vocab_size)
    p = counts[counts > 0] / counts.sum()
    unigram_entropy = float(-(p * np.log(p)).sum())
    with open(os.path.join(tiny_run, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    assert [m["step"] for m in metrics] == list(range(10, TINY_STEPS + 1, 10))
    first, last = metrics[0]["loss"], metrics[-1]["loss"]
    assert first > unigram_entropy  # it started out knowing nothing
    assert last < unigram_entropy - 0.5, (last, unigram_entropy)
    assert all(np.isfinite(m["grad_norm"]) and m["lr"] > 0 for m in metrics)


def test_tiny_run_leaves_a_checkpoint_with_params_config_and_tokenizer(tiny_run, tiny_tokenizer_path):
    model, tokenizer_bytes, config = checkpoint.load(tiny_run)
    with open(tiny_tokenizer_path, "rb") as f:
        assert tokenizer_bytes == f.read()
    assert checkpoint.latest_step(tiny_run) == TINY_STEPS
    assert config["model"] == dataclasses.asdict(model.config)
    assert model.config.vocab_size == 4096 and model.config.n_layers == 4
    assert config["train"]["steps"] == TINY_STEPS
    assert os.path.getsize(os.path.join(tiny_run, "loss.png")) > 1000


def test_generate_cli_samples_text_from_the_tiny_run(tiny_run):
    out = run_script("generate.py", f"--checkpoint={tiny_run}", "--prompt=Sherlock Holmes",
                     "--prompt=Le jeune homme", "--max_new_tokens=20", "--temperature=0").stdout
    assert "Sherlock Holmes" in out and "Le jeune homme" in out
    assert len(out) > len("Sherlock Holmes") + len("Le jeune homme") + 20


def one_device_step(model_config: ModelConfig, optimizer):
    """train.py's jitted step on a one-device mesh, called like the training loop calls it."""
    mesh = make_mesh(1)
    step = make_train_step(optimizer, shardings(abstract_state(model_config, optimizer, mesh)), mesh)
    votes = jnp.zeros((1,), bool)
    return lambda state, batch, i, nan=False: step(state, batch, jax.random.key(1), i, nan, votes)


def _step_once(batch_size: int, grad_accum: int, tokens: np.ndarray):
    # A large Adam epsilon: with the default 1e-8, Adam divides near-zero gradient entries by
    # their own magnitude, blowing float summation-order noise up to the full step size.
    config = TrainConfig(steps=10, batch_size=batch_size, grad_accum=grad_accum, warmup_steps=1,
                         learning_rate=1e-2, adam_eps=1e-3, opt_state_dtype="float32")
    optimizer = make_optimizer(config)
    state = init_state(TINY, optimizer, jax.random.key(0))
    batch = {"tokens": jnp.asarray(tokens.reshape(grad_accum, batch_size // grad_accum, -1))}
    # Two steps, so the second uses Adam moments built from the accumulated gradient.
    step = one_device_step(TINY, optimizer)
    state, m1 = step(state, batch, 0)
    state, m2 = step(state, batch, 1)
    return state, m1, m2


def test_k_micro_batches_give_the_same_update_as_one_k_times_larger_batch():
    tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, (8, TINY.max_seq_len + 1))
    whole, w1, w2 = _step_once(8, 1, tokens)
    accumulated, a1, a2 = _step_once(8, 4, tokens)
    np.testing.assert_allclose(w1["loss"], a1["loss"], rtol=1e-5)
    np.testing.assert_allclose(w1["grad_norm"], a1["grad_norm"], rtol=1e-4)
    for x, y in zip(jax.tree.leaves(whole.model), jax.tree.leaves(accumulated.model)):
        np.testing.assert_allclose(x, y, atol=1e-6)
    # ...while changing only the last micro-batch changes the update, so the comparison can fail.
    changed = tokens.copy()
    changed[-2:] = np.random.default_rng(1).integers(0, TINY.vocab_size, changed[-2:].shape)
    other, _, _ = _step_once(8, 4, changed)
    assert not np.allclose(other.model.lm_head, whole.model.lm_head, atol=1e-5)


def test_weight_decay_skips_norms_and_the_input_embedding():
    config = TrainConfig(steps=10, batch_size=1, warmup_steps=1, weight_decay=0.5, learning_rate=0.1)
    optimizer = make_optimizer(config)
    model = init_state(TINY, optimizer, jax.random.key(0)).model
    opt_state = optimizer.init(model)
    zero_grads = jax.tree.map(jnp.zeros_like, model)
    for _ in range(2):  # step 0 has learning rate 0 (warmup starts at 0)
        updates, opt_state = optimizer.update(zero_grads, opt_state, model)
        decayed = eqx.apply_updates(model, updates)
    assert np.array_equal(decayed.embed, model.embed)
    assert np.array_equal(decayed.final_norm.weight, model.final_norm.weight)
    assert np.array_equal(decayed.blocks.attn_norm.weight, model.blocks.attn_norm.weight)
    for name in ("wq", "wk", "wv", "wo"):
        shrunk = np.abs(getattr(decayed.blocks.attn, name)) < np.abs(getattr(model.blocks.attn, name))
        assert shrunk.all(), name
    assert (np.abs(decayed.lm_head) < np.abs(model.lm_head)).all()
    assert (np.abs(decayed.blocks.mlp.w_down) < np.abs(model.blocks.mlp.w_down)).all()


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_a_tenth_of_peak():
    config = TrainConfig(steps=1000, batch_size=1, warmup_steps=100, learning_rate=1.2e-3)
    lr = learning_rate_schedule(config)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(50)), 0.6e-3, rtol=1e-6)
    np.testing.assert_allclose(float(lr(100)), 1.2e-3, rtol=1e-6)
    halfway = 100 + 450  # cosine at half its span sits midway between peak and floor
    np.testing.assert_allclose(float(lr(halfway)), (1.2e-3 + 1.2e-4) / 2, rtol=1e-4)
    np.testing.assert_allclose(float(lr(1000)), 1.2e-4, rtol=1e-6)


def test_batch_of_a_step_is_a_pure_function_of_seed_and_step(tiny_tokenizer_path):
    tokenizer = Tokenizer.load(tiny_tokenizer_path)
    a = TokenRecords(DATA_FILES[:1], tokenizer, 64, seed=3)
    b = TokenRecords(DATA_FILES[:1], tokenizer, 64, seed=3)
    np.testing.assert_array_equal(a.batch(17, 8), b.batch(17, 8))
    assert not np.array_equal(a.batch(17, 8), TokenRecords(DATA_FILES[:1], tokenizer, 64, 4).batch(17, 8))
    # One epoch visits every record exactly once, whatever the batch boundaries.
    n = len(a.records)
    seen = np.concatenate([a.batch(s, 7) for s in range(n // 7 + 1)])[:n]
    rows = {r.tobytes() for r in seen}
    assert len(rows) == len({r.tobytes() for r in a.records})


def test_dry_run_prints_parameters_and_compiled_memory_without_training(tmp_path):
    out = run_script("train.py", "--flagfile=configs/tiny.flags", "--dry_run",
                     f"--output_dir={tmp_path}/never").stdout
    tiny = ModelConfig(vocab_size=4096, d_model=192, n_layers=4, n_heads=3, d_ff=512, max_seq_len=128)
    assert f"{num_params(tiny):,}" in out
    assert "per-device memory: temporaries" in out and "GiB" in out
    assert "training tokens" in out and "days" in out
    assert not os.path.exists(f"{tmp_path}/never")


def _train_error(tmp_path, *args) -> str:
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "train.py", "--flagfile=configs/tiny.flags", "--steps=2", "--warmup_steps=0",
                             f"--output_dir={tmp_path}", *args], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode != 0
    return result.stderr


def test_a_tokenizer_whose_vocabulary_differs_from_the_config_is_refused(tmp_path, tiny_tokenizer_path):
    err = _train_error(tmp_path, f"--tokenizer={tiny_tokenizer_path}", "--vocab_size=5000",
                       f"--train_data={DATA_FILES[0]}")
    assert "--vocab_size=5000" in err and "4096" in err and tiny_tokenizer_path in err


def test_a_missing_data_file_is_named(tmp_path, tiny_tokenizer_path):
    err = _train_error(tmp_path, f"--tokenizer={tiny_tokenizer_path}", "--train_data=data/nope.txt")
    assert "data/nope.txt" in err and "does not exist" in err


def test_heads_not_dividing_d_model_is_named(tmp_path, tiny_tokenizer_path):
    err = _train_error(tmp_path, f"--tokenizer={tiny_tokenizer_path}", f"--train_data={DATA_FILES[0]}",
                       "--n_heads=5")
    assert "n_heads=5" in err and "d_model=192" in err


def test_batch_not_divisible_by_accumulation_is_named():
    with pytest.raises(ValueError, match="--batch_size=6 is not divisible by --grad_accum=4"):
        TrainConfig(steps=10, batch_size=6, grad_accum=4, warmup_steps=1)
