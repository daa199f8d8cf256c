"""train.py: the optimizer, the jitted step, the data order, the CLI and what a run leaves behind."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import checkpoint
import forked
from conftest import DATA_FILES, REPO, TINY_STEPS, run_script
from stream import TokenRecords
from model import ModelConfig, num_params
from tokenizer_files import open_tokenizer, tokenizer_from_bytes
from optim import TrainConfig, make_optimizer
from parallel import make_mesh, shardings
from parallel import check_batch
from resume import check_resume
from train_step import (abstract_state, compile_held_out, compile_step, held_out_loss, init_state,
                        make_train_step)

TINY = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=2, d_ff=128, max_seq_len=32,
                   dtype="float32")


def test_tiny_run_loss_falls_below_the_unigram_entropy_of_its_data(tiny_run, tiny_tokenizer_path):
    # A model that ignores context can at best reach the entropy of the token frequencies; going
    # well below it means the model uses context. The bar is computed from the data, not chosen.
    tokenizer = open_tokenizer(tiny_tokenizer_path)
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


def test_batch_of_a_step_is_a_pure_function_of_seed_and_step(tiny_tokenizer_path):
    tokenizer = open_tokenizer(tiny_tokenizer_path)
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
    assert "per-chip memory: temporaries" in out and "MiB" in out
    assert "training tokens" in out and "days" in out
    assert not os.path.exists(f"{tmp_path}/never")


def _train_error(tmp_path, *args) -> str:
    result = forked.run([sys.executable, "train.py", "--flagfile=configs/tiny.flags", "--steps=2", "--warmup_steps=0",
                     f"--output_dir={tmp_path}", *args], capture_output=True, text=True, cwd=REPO)
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


# --- The health check, the mesh ------------------------------------


def test_a_non_finite_step_leaves_parameters_and_moments_untouched():
    config = TrainConfig(steps=10, batch_size=2, warmup_steps=0)
    optimizer = make_optimizer(config)
    state = init_state(TINY, optimizer, jax.random.key(0))
    before = jax.tree.map(np.asarray, state)
    tokens = {"tokens": jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 2, TINY.max_seq_len + 1)))}
    step = one_device_step(TINY, optimizer)
    state, metrics = step(state, tokens, 0, True)
    assert bool(metrics["skipped"]) and not np.isfinite(metrics["loss"])
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(state)):
        np.testing.assert_array_equal(x, y)
    state, metrics = step(state, tokens, 1, False)  # ...and a finite one changes them
    assert not bool(metrics["skipped"])
    assert not np.array_equal(before.model.lm_head, state.model.lm_head)


@pytest.mark.slow  # two XLA:TPU compiles
def test_dry_run_shows_fsdp_dividing_the_per_device_state(tmp_path):
    fit_lines = []
    def argument_mib(*args):
        out = run_script("train.py", "--flagfile=configs/tiny.flags", "--dry_run", "--hardware=v4-8",
                         f"--output_dir={tmp_path}/never", *args).stdout
        assert "{'data': %d, 'fsdp': %d}" % (4 // int(args[0][7:]), int(args[0][7:])) in out
        fit_lines.extend(l for l in out.splitlines() if l.startswith("verdict (one chip)"))
        line = next(l for l in out.splitlines() if l.startswith("per-chip memory: arguments"))
        value, unit = line.split()[-2:]
        return float(value) * {"GiB": 1024, "MiB": 1}[unit]

    replicated, sharded = argument_mib("--fsdp=1"), argument_mib("--fsdp=4")
    assert fit_lines[0].split()[3] == "fits:", fit_lines  # the tiny model fits a v4 chip
    assert sharded < 0.3 * replicated, (replicated, sharded)


# --- Whole runs: resume, preemption, NaNs, processes, fsdp ----------------------------------------

SMALL = ["--flagfile=configs/tiny.flags", "--d_model=64", "--n_layers=2", "--n_heads=2", "--d_ff=128",
         "--seq_len=32", "--batch_size=4", "--warmup_steps=2", "--log_every=1", "--learning_rate=1e-2",
         "--peak_tflops=1"]


def train_command(out, tokenizer: str, *args: str) -> list[str]:
    return [sys.executable, os.path.join(REPO, "train.py"), *SMALL, f"--tokenizer={tokenizer}",
            f"--train_data={DATA_FILES[0]}", f"--output_dir={out}", *args]


def run_train(out, tokenizer, *args, env=None, expect=0) -> subprocess.CompletedProcess:
    result = forked.run(train_command(out, tokenizer, *args), cwd=REPO, capture_output=True,
                        text=True, timeout=600, env=env)
    assert result.returncode == expect, result.stdout + result.stderr
    return result


def logged(out) -> dict[int, tuple[float, float]]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in records if "loss" in r}


def events(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "event" in r]


def drawn_in(png, color: str) -> bool:
    """Whether `png` has pixels of this matplotlib color (the marks of plot_loss)."""
    import matplotlib.colors
    import matplotlib.image

    rgb = matplotlib.image.imread(png)[..., :3]
    return bool((np.abs(rgb - np.array(matplotlib.colors.to_rgb(color))).max(axis=-1) < 0.02).any())


def with_devices(n: int) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}


def with_faults(nan_batches: str = "", sigkill_during_save: int = -1) -> dict:
    """The environment with train.injected_faults' test-only variables set."""
    return {**os.environ, "JULIAN_TEST_NAN_BATCHES": nan_batches,
            "JULIAN_TEST_SIGKILL_DURING_SAVE": str(sigkill_during_save)}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_tokenizer_path):
    out = tmp_path_factory.mktemp("uninterrupted")
    run_train(out, tiny_tokenizer_path, "--steps=60")
    return logged(out)


@pytest.mark.slow  # two 60-step runs
def test_sigterm_checkpoints_and_the_same_command_resumes_with_identical_losses(
        tmp_path, tiny_tokenizer_path, uninterrupted):
    command = train_command(tmp_path, tiny_tokenizer_path, "--steps=60")
    process = forked.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        assert process.poll() is None and time.time() < deadline, process.stdout.read()
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    stopped = checkpoint.latest_step(str(tmp_path))
    assert f"checkpoint of step {stopped} written" in output and 5 <= stopped < 60, output

    resumed = run_train(tmp_path, tiny_tokenizer_path, "--steps=60").stdout
    assert f"resumed from step {stopped}" in resumed
    # The same batches, dropout keys and optimizer state: bit-for-bit the same losses on CPU.
    assert logged(tmp_path) == uninterrupted
    # metrics.jsonl records the resume, and loss.png marks it.
    assert [(e["event"], e["step"]) for e in events(tmp_path)] == [("resume", stopped)]
    assert drawn_in(tmp_path / "loss.png", "tab:green") and not drawn_in(tmp_path / "loss.png", "tab:red")


def test_rerunning_a_finished_run_trains_nothing_and_records_no_resume(tmp_path, tiny_tokenizer_path):
    run_train(tmp_path, tiny_tokenizer_path, "--steps=4", "--log_every=2")
    before = (tmp_path / "metrics.jsonl").read_text()
    again = run_train(tmp_path, tiny_tokenizer_path, "--steps=4", "--log_every=2").stdout
    assert "already holds step 4 of 4: nothing to train" in again and "resumed" not in again
    assert (tmp_path / "metrics.jsonl").read_text() == before and events(tmp_path) == []


def test_sigkill_during_an_async_save_resumes_from_the_previous_complete_checkpoint(
        tmp_path, tiny_tokenizer_path, uninterrupted):
    run_train(tmp_path, tiny_tokenizer_path, "--steps=60", "--checkpoint_every=20",
              env=with_faults(sigkill_during_save=40), expect=-signal.SIGKILL)
    assert checkpoint.latest_step(str(tmp_path)) == 20
    resumed = run_train(tmp_path, tiny_tokenizer_path, "--steps=60", "--checkpoint_every=20").stdout
    assert "resumed from step 20" in resumed
    assert logged(tmp_path) == uninterrupted


@pytest.mark.slow  # three training runs
def test_nan_steps_are_skipped_then_rolled_back_past_then_stop_the_run(tmp_path, tiny_tokenizer_path):
    once = run_train(tmp_path / "once", tiny_tokenizer_path, "--steps=12", env=with_faults("3"))
    record = [json.loads(l) for l in open(tmp_path / "once" / "metrics.jsonl")][-1]
    assert record["skipped_steps"] == 1 and record["rollbacks"] == 0 and np.isfinite(record["loss"])
    assert "rolled back" not in once.stdout
    assert events(tmp_path / "once") == [] and not drawn_in(tmp_path / "once" / "loss.png", "tab:red")

    rolled = run_train(tmp_path / "rolled", tiny_tokenizer_path, "--steps=12", "--checkpoint_every=4",
                       "--max_bad_steps=2", env=with_faults("5,6")).stdout
    assert "rolled back to step 4, the data moves on to position 7" in rolled
    ckpt = checkpoint.Checkpointer(str(tmp_path / "rolled"))
    meta = ckpt.manager.restore(12, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    ckpt.close()
    assert meta["data_offset"] == 3 and meta["rollbacks"] == 1
    assert [(e["event"], e["step"], e["from_step"]) for e in events(tmp_path / "rolled")] == [("rollback", 4, 7)]
    assert drawn_in(tmp_path / "rolled" / "loss.png", "tab:red")
    assert all(np.isfinite(loss) for loss, _ in logged(tmp_path / "rolled").values())

    stopped = run_train(tmp_path / "stopped", tiny_tokenizer_path, "--steps=12", "--checkpoint_every=4",
                        "--max_bad_steps=2", "--max_rollbacks=1", env=with_faults("5,6,9,10"),
                        expect=1).stderr
    assert "after 1 rollbacks (--max_rollbacks=1)" in stopped and "data positions 9..10" in stopped


@pytest.fixture(scope="module")
def one_process_of_four(tmp_path_factory, tiny_tokenizer_path):
    """6 float32 steps on one process with 4 devices, parameters replicated."""
    out = tmp_path_factory.mktemp("one_process_of_four")
    run_train(out, tiny_tokenizer_path, "--steps=6", "--dtype=float32", env=with_devices(4))
    return logged(out)


@pytest.mark.slow  # two jax.distributed processes and a reference run
def test_two_processes_of_two_devices_train_like_one_process_of_four(tmp_path, tiny_tokenizer_path,
                                                                     one_process_of_four):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    processes = [forked.Popen(
        train_command(tmp_path / "two", tiny_tokenizer_path, "--steps=6", "--dtype=float32",
                      f"--coordinator_address=127.0.0.1:{port}",
                      "--num_processes=2", f"--process_id={i}"),
        cwd=REPO, env=with_devices(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    assert "2 processes, mesh {'data': 4, 'fsdp': 1}" in outputs[0]
    assert "parameters" not in outputs[1]  # only process 0 logs
    one, two = one_process_of_four, logged(tmp_path / "two")
    assert one.keys() == two.keys() == set(range(1, 7))
    # Same global arrays and program; only the cross-device sums' transport differs (in-process
    # vs gloo), which may reorder float additions: agreement to float32 rounding. Adam divides
    # each gradient by its own magnitude, so a rounding-level difference in a near-zero gradient
    # moves its parameter by up to a whole step: the next gradient norm may differ by ~1e-4
    # (2.24e-4 measured at one step once the mesh came from mesh_utils and the loss in chunks, with
    # losses still within 1e-5: a wrong sum would be off by far more).
    for step in one:
        np.testing.assert_allclose(one[step][0], two[step][0], rtol=1e-5)
        np.testing.assert_allclose(one[step][1], two[step][1], rtol=5e-4)


@pytest.mark.slow  # two runs on four fake devices
def test_fsdp_over_two_devices_trains_like_replicated_parameters(tmp_path, tiny_tokenizer_path,
                                                                one_process_of_four):
    run_train(tmp_path / "fsdp", tiny_tokenizer_path, "--steps=6", "--dtype=float32", "--fsdp=2",
              env=with_devices(4))
    replicated, sharded = one_process_of_four, logged(tmp_path / "fsdp")
    assert replicated.keys() == sharded.keys() == set(range(1, 7))
    # Sharded parameters change where the gradient sums happen (reduce-scatter instead of
    # all-reduce), hence their float rounding: measured 3e-7 on losses, and 2e-5 on gradient norms
    # on one CPU but 1.09e-4 on another (an AMD EPYC without AVX-512, at step 4, on 130cdb0 too):
    # as in the two-process test above, Adam turns a rounding-level difference in a near-zero
    # gradient into up to a whole step of its parameter.
    for step in replicated:
        np.testing.assert_allclose(replicated[step][0], sharded[step][0], rtol=1e-5)
        np.testing.assert_allclose(replicated[step][1], sharded[step][1], rtol=2e-4)


def test_resuming_another_models_checkpoint_names_the_differing_flag(tmp_path, tiny_tokenizer_path):
    run_train(tmp_path, tiny_tokenizer_path, "--steps=3")
    err = run_train(tmp_path, tiny_tokenizer_path, "--steps=6", "--d_ff=256", expect=2).stderr
    assert "--d_ff: the checkpoint has 128, the flags say 256" in err and str(tmp_path) in err


def test_an_unwritable_output_dir_fails_before_training(tmp_path, tiny_tokenizer_path):
    (tmp_path / "file").write_text("not a directory")
    err = run_train(tmp_path / "file" / "run", tiny_tokenizer_path, "--steps=3", expect=2).stderr
    assert f"--output_dir={tmp_path / 'file' / 'run'} is not writable" in err
    assert "parameters" not in err


@pytest.mark.slow  # two 60-step runs through the GCS emulator
def test_checkpoints_on_gcs_resume_like_local_ones(tmp_path, tiny_tokenizer_path, gcs_bucket, uninterrupted):
    # Orbax writes arrays through TensorStore and directories through gcsfs, both pointed at the
    # emulator by the fixture: the real clients, a local server.
    run = f"gs://{gcs_bucket}/runs/resume"
    run_train(run, tiny_tokenizer_path, "--steps=60", "--checkpoint_every=25",
              f"--metrics_dir={tmp_path}", env=with_faults(sigkill_during_save=50), expect=-signal.SIGKILL)
    assert checkpoint.latest_step(run) == 25
    resumed = run_train(run, tiny_tokenizer_path, "--steps=60", f"--metrics_dir={tmp_path}").stdout
    assert "resumed from step 25" in resumed
    assert logged(tmp_path) == uninterrupted
    model, _, config = checkpoint.load(run)
    assert config["train"]["steps"] == 60 and model.config.d_model == 64


def test_tpu_script_copies_the_repo_to_every_worker_and_runs_the_same_command(tmp_path):
    # A stand-in for the gcloud CLI with two "workers" (directories): scp copies, ssh runs the
    # command in each. The script's packaging and quoting are what is under test.
    fake = tmp_path / "gcloud"
    fake.write_text(r'''#!/usr/bin/env bash
set -e
case "$4" in
  scp) for w in 0 1; do mkdir -p "$ROOT/w$w"; cp "$5" "$ROOT/w$w/julian.tgz"; done ;;
  ssh) command=${@: -1}; command=${command#--command=}
       for w in 0 1; do (cd "$ROOT/w$w" && bash -c "$command") > "$ROOT/w$w.log" 2>&1 || true; done ;;
esac
''')
    fake.chmod(0o755)
    env = {**os.environ, "GCLOUD": str(fake), "ROOT": str(tmp_path)}
    # The status is not the check (the fake gcloud hides it): the workers' output is.
    subprocess.run([os.path.join(REPO, "scripts", "tpu.sh"), "my-v4-32", "us-central2-b", sys.executable,
                    "train.py", "--help"], env=env, capture_output=True, timeout=120)
    for w in (0, 1):
        log = (tmp_path / f"w{w}.log").read_text()
        assert "--coordinator_address" in log and "--fsdp" in log, log
        assert (tmp_path / f"w{w}" / "julian" / "configs" / "600m.flags").exists()


def test_eval_tasks_score_the_model_during_training_as_evaluate_py_does(tmp_path, tiny_tokenizer_path):
    run_train(tmp_path, tiny_tokenizer_path, "--steps=3", "--eval_every=3", "--eval_tasks=piqa",
              f"--eval_data_dir={os.path.join(REPO, 'samples', 'eval')}", "--eval_limit=6")
    with open(tmp_path / "metrics.jsonl") as f:
        scores = [json.loads(line) for line in f if "piqa/acc" in line]
    assert [s["step"] for s in scores] == [3]
    import evaluate
    model, tokenizer_bytes, _ = checkpoint.load(str(tmp_path))
    reference = evaluate.run_tasks(model, tokenizer_from_bytes(tokenizer_bytes), ["piqa"],
                                   os.path.join(REPO, "samples", "eval"), limit=6)["piqa"]
    assert scores[0]["piqa/acc"] == reference["acc,none"]
    assert scores[0]["piqa/acc_norm"] == reference["acc_norm,none"]


def test_logged_learning_rate_is_the_one_the_optimizer_applied_after_a_skipped_step():
    config = TrainConfig(steps=100, batch_size=2, warmup_steps=10, learning_rate=1.0, opt_state_dtype="float32")
    optimizer = make_optimizer(config)
    mesh = make_mesh(1)
    step = make_train_step(optimizer, shardings(abstract_state(TINY, optimizer, mesh)), mesh, config=config)
    state = init_state(TINY, optimizer, jax.random.key(0))
    batch = {"tokens": jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 2, TINY.max_seq_len + 1)))}
    votes = jnp.zeros((1,), bool)
    rates = []
    for i, nan in enumerate((False, True, False, False)):  # step 1 is non-finite: skipped
        state, metrics = step(state, batch, jax.random.key(1), i, nan, votes)
        rates.append((bool(metrics["skipped"]), float(metrics["lr"])))
    # The warmup's rate advances with the updates made, not with the step number (the schedule
    # of step - 1 logged 0.3 at step 4, while the optimizer applied 0.2).
    assert rates == [(False, 0.0), (True, pytest.approx(0.1)), (False, pytest.approx(0.1)), (False, pytest.approx(0.2))]


def test_held_out_loss_needs_no_more_temporaries_than_the_train_step_at_grad_accum_8():
    # The logits dominate: a vocabulary of 4,096 on 64 rows of 128 tokens in 8 micro-batches.
    model_config = ModelConfig(vocab_size=4096, d_model=64, n_layers=2, n_heads=2, d_ff=128, max_seq_len=128)
    config = TrainConfig(steps=10, batch_size=64, grad_accum=8, warmup_steps=1)
    mesh = make_mesh(1)
    step = compile_step(model_config, config, mesh).memory_analysis().temp_size_in_bytes
    held_out = compile_held_out(model_config, config, mesh).memory_analysis().temp_size_in_bytes
    assert held_out <= step, (held_out, step)


def test_held_out_loss_over_micro_batches_is_the_loss_over_the_whole_batch():
    optimizer = make_optimizer(TrainConfig(steps=10, batch_size=8, warmup_steps=1))
    model = init_state(TINY, optimizer, jax.random.key(0)).model
    tokens = np.random.default_rng(0).integers(0, 256, (8, TINY.max_seq_len + 1)).astype(np.int32)

    class Rows:  # validation data as stream.py lays it out: this process's rows, micro-batch by micro-batch
        def __init__(self, grad_accum):
            self.grad_accum = grad_accum

        def batch(self, i):
            return tokens

    losses = [held_out_loss(Rows(k), 1, make_mesh(1))(model)["eval_loss"] for k in (1, 4)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and losses[0] > 1.0


def test_batch_that_does_not_split_over_the_devices_is_refused_naming_the_flags_that_fix_it():
    check_batch(8, 2, 4)  # micro-batches of 4 rows on 4 devices
    with pytest.raises(ValueError) as e:
        check_batch(4, 2, 4)
    assert str(e.value) == ("--batch_size=4 --grad_accum=2 makes micro-batches of 2 rows, which do not split over "
                            "4 devices: use --grad_accum=1 or --batch_size=8 --grad_accum=2")
    with pytest.raises(ValueError, match="use --batch_size=12 --grad_accum=3$"):
        check_batch(9, 3, 4)  # no --grad_accum divides 9 into multiples of 4


def test_resume_refuses_changed_batch_seed_schedule_or_data_and_allows_longer_steps():
    saved = {"model": {}, "run": {"log_every": 10},
             "train": dataclasses.asdict(TrainConfig(steps=100, batch_size=8, warmup_steps=10)),
             "tokenizer": "tok.model", "train_data": "shards/"}
    same = json.loads(json.dumps(saved))
    same["run"]["log_every"] = 1  # how the run executes: free to change
    same["train"]["grad_accum"] = 4  # the same global batch, split otherwise
    assert check_resume(saved, same, "--output_dir=runs/x") is None
    longer = json.loads(json.dumps(saved))
    longer["train"]["steps"] = 200
    assert "--steps 100 -> 200" in check_resume(saved, longer, "--output_dir=runs/x")
    changed = json.loads(json.dumps(saved))
    changed["train"].update(batch_size=16, seed=3)
    changed["train_data"] = "other/"
    with pytest.raises(ValueError) as e:
        check_resume(saved, changed, "--output_dir=runs/x")
    message = str(e.value)
    assert message.startswith("--output_dir=runs/x holds a run with other settings")
    for named in ("--batch_size 8 -> 16", "--seed 0 -> 3", "--train_data 'shards/' -> 'other/'"):
        assert named in message
    shorter = json.loads(json.dumps(saved))
    shorter["train"].update(steps=50, warmup_steps=5)
    with pytest.raises(ValueError, match=r"--warmup_steps 10 -> 5; --steps 100 -> 50 \(a shorter schedule\)"):
        check_resume(saved, shorter, "--output_dir=runs/x")
    # sft.py's and dpo.py's data settings are compared too (a tuple of the flags is a list once saved).
    assert check_resume({**saved, "sft": {"train_data": ["a.jsonl"]}}, {**saved, "sft": {"train_data": ("a.jsonl",)}},
                        "--output_dir=runs/x") is None
    sft_saved = {**saved, "sft": {"seq_len": 128, "files": [1], "rows": 10, "epochs": 1.0}}
    sft_now = {**saved, "sft": {"seq_len": 64, "files": [1], "rows": 10, "epochs": 2.0}}
    with pytest.raises(ValueError, match="--seq_len 128 -> 64"):
        check_resume(sft_saved, sft_now, "--output_dir=runs/x")


def test_mesh_puts_each_fsdp_group_on_neighbouring_chips_of_a_tpu_slice():
    import budget

    devices = budget.target_devices("v5e-16")  # 16 chips as a 4x4 torus, through libtpu
    mesh = make_mesh(4, devices)
    assert mesh.shape == {"data": 4, "fsdp": 4}
    # Each group of 4 that shards the state is a line of the torus, every hop one link (in
    # jax.devices()' raw order it was a 2x2 block walked corner to opposite corner).
    for group in mesh.devices:
        hops = [sum(abs(a - b) for a, b in zip(x.coords, y.coords)) for x, y in zip(group, group[1:])]
        assert hops == [1, 1, 1], [x.coords for x in group]


def test_mesh_over_several_slices_keeps_each_fsdp_group_inside_one_slice():
    from jax.experimental import topologies

    devices = list(topologies.get_topology_desc("v5e:2x2", "tpu", num_slices=2).devices)  # 2 slices x 4 chips
    mesh = make_mesh(2, devices)
    assert mesh.shape == {"data": 4, "fsdp": 2}
    assert [[d.slice_index for d in group] for group in mesh.devices] == [[0, 0], [0, 0], [1, 1], [1, 1]]
    with pytest.raises(ValueError, match="--fsdp=8 must divide the 4 devices of one slice"):
        make_mesh(8, devices)
