"""runlog.py: the interval logger's records, where each interval's time goes, profiler traces of
chosen steps, and the Weights & Biases run (offline)."""

import glob
import gzip
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest

import forked
from conftest import DATA_FILES, REPO
import runlog
from runlog import PHASES, IntervalLogger, PhaseTimes, ProfileConfig, ProfileWindow, WandbConfig, open_wandb

METRICS = {"grad_norm": 1.0, "skipped": False, "supervised_tokens": 8, "lr": 1e-3}
# train.py with a model small enough for a few steps a second (test_train.py's).
SMALL = ["--flagfile=configs/tiny.flags", "--d_model=64", "--n_layers=2", "--n_heads=2", "--d_ff=128",
         "--seq_len=32", "--batch_size=4", "--warmup_steps=2", "--learning_rate=1e-2", "--peak_tflops=1"]


def logger_in(directory, every: int, wandb_run=None) -> IntervalLogger:
    return IntervalLogger(str(directory), every=every, steps=100,
                          tokens_per_step=8, flops_per_step=1.0, peak_flops=1.0, wandb_run=wandb_run)


def records_of(directory) -> list[dict]:
    with open(os.path.join(directory, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_a_stopping_run_logs_the_steps_since_its_last_record(tmp_path):
    logger = logger_in(tmp_path, every=10)
    lines = [logger.log(s, {"loss": float(s), **METRICS}, PhaseTimes(), {}, last=s == 13) for s in range(1, 14)]
    logger.close()
    assert [bool(line) for line in lines] == [s in (10, 13) for s in range(1, 14)]
    records = records_of(tmp_path)
    assert [(r["step"], r["loss"]) for r in records] == [(10, 5.5), (13, 12.0)]  # means of 1..10 and 11..13



def test_mfu_never_prints_above_100_percent_and_the_line_says_the_peak_is_stale(tmp_path):
    # flops_per_step 1.0 against a peak of 1.0 FLOP/s: a step under a second is "over 100%".
    logger = logger_in(tmp_path, every=1)
    logger.log(1, {"loss": 1.0, **METRICS}, PhaseTimes(), {})  # the first step starts the clock
    line = logger.log(2, {"loss": 1.0, **METRICS, "lr": 2e-3}, PhaseTimes(), {})
    logger.close()
    assert "MFU n/a (over 100% of 1e-12 TFLOP/s: that peak is stale or wrong" in line
    assert "| lr 2.00e-03 |" in line  # the step's own learning rate
    assert runlog.mfu_text(0.413, 1e12) == "MFU 41.3%"

def spend(seconds: float, times: PhaseTimes | None = None, phase: str = ""):
    if times is None:
        time.sleep(seconds)
        return
    with times(phase):
        time.sleep(seconds)


def test_each_interval_splits_its_time_into_data_wait_step_host_and_checkpoint(tmp_path):
    # The loop of train.fit in miniature, each phase a sleep of known length: at least that long
    # must land in that phase (sleeps never end early), and the shares must add up to the interval.
    logger, times = logger_in(tmp_path, every=2), PhaseTimes()
    lines = []
    for step in range(1, 6):
        spend(0.03, times, "data_wait")
        spend(0.3 if step == 1 else 0.06, times, "step")  # the first step compiles: in no interval
        spend(0.02)  # host work
        lines.append(logger.log(step, {"loss": 1.0, **METRICS}, times, {}))
        if step == 3:
            spend(0.05, times, "checkpoint")
    logger.close()
    records = records_of(tmp_path)
    assert [r["step"] for r in records] == [2, 4]
    for record, steps, checkpoint in zip(records, (1, 2), (0.0, 0.05)):
        for phase, least in (("data_wait", 0.03), ("step", 0.06), ("host", 0.02)):
            assert least * steps <= record[f"{phase}_s"] < least * steps + 0.25, (phase, record)
        assert checkpoint <= record["checkpoint_s"] < checkpoint + 0.25 and record["eval_s"] == 0
        assert sum(record[f"{p}_fraction"] for p in PHASES) == pytest.approx(1.0)
        assert record["data_wait_fraction"] == pytest.approx(record["data_wait_s"] / sum(record[f"{p}_s"] for p in PHASES))
    assert "data wait 0.03 s" in lines[1] and "checkpoint 0.00 s (0%)" in lines[1] and "eval" not in lines[1]
    summary = logger.summary()
    assert summary.startswith("where the time went: step dominated")
    assert "Waiting for data took" in summary and "--block_records" in summary  # 0.03 of 0.11+ s: over 5%

    (tmp_path / "quiet").mkdir()
    quiet = logger_in(tmp_path / "quiet", every=1)
    for step in range(1, 3):
        spend(0.05, times, "step")
        quiet.log(step, {"loss": 1.0, **METRICS}, times, {})
    quiet.close()
    assert quiet.summary().startswith("where the time went: step dominated")
    assert "Waiting for data" not in quiet.summary()


class SlowStream:
    """A training stream whose batches come `delay` seconds late: an input pipeline that does
    not keep up."""

    def __init__(self, stream, delay: float):
        self.stream, self.delay = stream, delay

    def __getattr__(self, name):
        return getattr(self.stream, name)

    def iterate(self, start_step: int):
        batches = self.stream.iterate(start_step)
        try:
            for item in batches:
                time.sleep(self.delay)
                yield item
        finally:
            batches.close()


def test_a_slow_data_stream_shows_up_as_data_wait_and_the_summary_says_what_to_change(
        tmp_path, tiny_tokenizer_path, capsys):
    import train
    from model import ModelConfig
    from tokenizer_files import open_tokenizer

    model_config = ModelConfig(vocab_size=4096, d_model=64, n_layers=2, n_heads=2, d_ff=128, max_seq_len=32)
    config = train.TrainConfig(steps=6, batch_size=4, warmup_steps=1)
    run = train.RunConfig(output_dir=str(tmp_path), metrics_dir=str(tmp_path), log_every=2, peak_tflops=1.0)
    tokenizer = open_tokenizer(tiny_tokenizer_path)
    data = SlowStream(train.open_data(DATA_FILES[0], "train", tokenizer, model_config, config), delay=0.3)
    train.fit(model_config, config, run, data, [], tokenizer.model_bytes,
              train.resolved_config(model_config, config, run))
    out = capsys.readouterr().out
    records = [r for r in records_of(tmp_path) if "loss" in r]
    assert [r["step"] for r in records] == [2, 4, 6]
    # Steps 2..6 are timed (the first compiles). The loop runs one step ahead, so an interval's
    # waits are for the batches it fetched, not its own steps' (measured: 1, 2 and 1 delays): each
    # interval waited the delay at least once.
    assert [r["data_wait_s"] >= 0.3 for r in records] == [True] * 3, records
    assert all(r["data_wait_fraction"] > 0.05 for r in records)
    assert "Waiting for data took" in out and "--block_records" in out, out


def trace_steps(directory) -> list[int]:
    """The step numbers annotated in the traces under `directory` (ProfileWindow's StepTraceAnnotation)."""
    steps = []
    for path in glob.glob(os.path.join(directory, "plugins", "profile", "*", "*.trace.json.gz")):
        with gzip.open(path) as f:
            steps += [int(e["args"]["step_num"]) for e in json.load(f)["traceEvents"] if e.get("name") == "train"]
    return sorted(steps)


@pytest.mark.parametrize("first, primary, traced", [(0, True, [4, 5]), (3, True, [5]), (4, True, []), (9, True, []),
                                                    (0, False, [])])
def test_a_profile_window_3_5_traces_the_part_of_it_after_a_process_first_step(tmp_path, first, primary, traced):
    # A process resumed at step `first` compiles during its first step: the trace skips it.
    # Processes other than 0 trace only with --profile_all_hosts.
    f = jax.jit(lambda x: x @ x)
    window = ProfileWindow(ProfileConfig(3, 5, str(tmp_path)), first, primary)
    x = jnp.ones((8, 8))
    for step in range(first, 8):
        with window.step(step):
            x = f(x).block_until_ready()
    window.close()
    assert trace_steps(tmp_path) == traced


@pytest.mark.slow  # a traced training run
def test_profile_steps_writes_a_trace_and_the_console_shows_the_time_breakdown(tmp_path, tiny_tokenizer_path):
    # As a user runs it; -X importtime lists every module the run imported.
    result = subprocess.run(
        [sys.executable, "-X", "importtime", os.path.join(REPO, "train.py"), *SMALL, "--steps=6", "--log_every=2",
         "--checkpoint_every=3", "--profile_steps=3:5", f"--tokenizer={tiny_tokenizer_path}",
         f"--train_data={DATA_FILES[0]}", f"--output_dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    profile = tmp_path / "profile" / "plugins" / "profile"
    assert glob.glob(str(profile / "*" / "*.xplane.pb")) and trace_steps(tmp_path / "profile") == [4, 5]
    assert f"trace of steps 4..5 written to {tmp_path / 'profile'}" in result.stdout

    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 3 and all(f"{label} " in line for line in lines
                                   for label in ("data wait", "step", "host", "checkpoint")), lines
    records = [r for r in records_of(tmp_path) if "loss" in r]
    for record in records:
        assert sum(record[f"{p}_fraction"] for p in PHASES) == pytest.approx(1.0)
    # The checkpoint of step 3 is saved inside the interval of steps 3..4; that of step 6 after the last record.
    assert [r["checkpoint_s"] > 0 for r in records] == [False, True, False]
    assert "where the time went: " in result.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")]
    assert "jax" in imported and not any(name.split(".")[0] == "wandb" for name in imported)


def wandb_records(run_dir) -> list[dict]:
    """The records of a run's .wandb file, read by W&B's own reader (`wandb leet inspect --json`)."""
    (path,) = glob.glob(os.path.join(run_dir, "*.wandb"))
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", path],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def history(records: list[dict]) -> list[dict]:
    return [r["history"]["item"] for r in records if r["type"] == "history"]


def offline_wandb(tmp_path) -> dict:
    """W&B without an account or network (checked with strace: no socket but AF_UNIX ones, the
    W&B service's own, and netlink); its own directories in tmp_path."""
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
            "WANDB_CONFIG_DIR": str(tmp_path / "config"), "WANDB_CACHE_DIR": str(tmp_path / "cache"),
            "WANDB_DATA_DIR": str(tmp_path / "data")}


def test_wandb_gets_the_records_and_resume_and_rollback_events_and_a_rerun_continues_its_id(
        tmp_path, monkeypatch):
    for name, value in offline_wandb(tmp_path).items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "run"
    out.mkdir()
    ids = []
    for resumed in (False, True):
        run = open_wandb(WandbConfig("x", name="tiny"), str(out), str(out), {"train": {"steps": 100}})
        ids.append(run.id)
        logger, times = logger_in(out, every=1, wandb_run=run), PhaseTimes()
        if resumed:
            logger.write({"step": 2, "event": "resume", "time": time.time()})
        for step in (3, 4) if resumed else (1, 2):
            logger.log(step, {"loss": float(step), **METRICS}, times, {})
        if resumed:
            logger.restart(3)
            logger.write({"step": 3, "event": "rollback", "from_step": 4, "time": time.time()})
        logger.close()
    assert ids[0] == ids[1] == json.loads((out / "wandb_run.json").read_text())["id"]
    runs = sorted(glob.glob(str(out / "wandb" / "offline-run-*")))
    assert len(runs) == 2 and all(r.endswith(f"-{ids[0]}") for r in runs)
    first, second = wandb_records(runs[0]), wandb_records(runs[1])
    for records, steps in ((first, [1, 2]), (second, [3, 4])):
        assert [h["loss"] for h in history(records) if "loss" in h] == steps
        assert [r["run"]["config"]["update"]["train"] for r in records if r["type"] == "run"] == [{"steps": 100}]
    events = [(h["step"], k, h[k]) for h in history(second) for k in h if k.startswith("event/")]
    assert events == [(2, "event/resume", 2), (3, "event/rollback", 4)]


@pytest.mark.slow
def test_wandb_offline_run_holds_the_metrics_config_and_loss_curve_and_a_resumed_run_appends(
        tmp_path, tiny_tokenizer_path):
    env = {**os.environ, **offline_wandb(tmp_path)}
    out = tmp_path / "run"
    for steps in (4, 6):  # the second command resumes at step 4 and trains to 6
        result = forked.run(
            [sys.executable, os.path.join(REPO, "train.py"), *SMALL, f"--steps={steps}", "--log_every=1",
             "--wandb_project=x", "--wandb_run_name=tiny", f"--tokenizer={tiny_tokenizer_path}",
             f"--train_data={DATA_FILES[0]}", f"--output_dir={out}"],
            cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stdout + result.stderr[-5000:]

    run_id = json.loads((out / "wandb_run.json").read_text())["id"]
    runs = sorted(glob.glob(str(out / "wandb" / "offline-run-*")))
    assert len(runs) == 2 and all(r.endswith(f"-{run_id}") for r in runs)
    first, resumed = wandb_records(runs[0]), wandb_records(runs[1])
    for records in (first, resumed):
        (start,) = [r["run"] for r in records if r["type"] == "run"]
        assert start["run_id"] == run_id and start["project"] == "x" and start["display_name"] == "tiny"
        assert start["config"]["update"]["model"]["d_model"] == 64
        assert [r["exit"]["exit_code"] for r in records if r["type"] == "exit"] == [0]
    # The same metrics as metrics.jsonl, against the training step.
    logged = {r["step"]: r for r in records_of(out) if "loss" in r}
    losses = {h["step"]: h["loss"] for h in history(first) + history(resumed) if "loss" in h}
    assert losses == pytest.approx({step: r["loss"] for step, r in logged.items()}) and sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert all("step_fraction" in h for h in history(first) if "loss" in h)
    assert [h["event/resume"] for h in history(resumed) if "event/resume" in h] == [4]
    for run_dir, records in zip(runs, (first, resumed)):  # loss.png as an image (W&B flattens its fields)
        (curve,) = [h["loss_curve.path"] for h in history(records) if "loss_curve.path" in h]
        assert os.path.getsize(os.path.join(run_dir, "files", curve)) > 1000
