"""A run's record: the output check at start, metrics.jsonl, TensorBoard, Weights & Biases, the
console line, the loss curve, where the time went, and profiler traces.

Every --log_every steps, one console line, one metrics.jsonl record and TensorBoard scalars (step,
loss, lr, grad norm, tokens/s, MFU, ETA, and where the interval's time went: waiting for data, in
the step, in host work, on checkpoints, in evaluation); resumes and rollbacks are records too, and
loss.png marks them. With --wandb_project, the same records, the resolved config and loss.png go
to a W&B run whose id OUTPUT_DIR/wandb_run.json keeps, so that a resumed run continues it.
--profile_steps=START:END writes an XLA trace of those steps (jax.profiler) for TensorBoard's
profile plugin or Perfetto.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import time
import uuid

import jax
import numpy as np
from absl import flags
from tqdm import tqdm

import storage

# A perplexity past this is a model that cannot predict the targets at all (worse than a 1-in-1,000
# guess per target): its value and bootstrapped error are noise in nine digits, so tables name it.
UNPREDICTED_PERPLEXITY = 1_000.0


def perplexity_text(value: float) -> str:
    """A perplexity as a table shows it: two decimals, or what it means when the model cannot predict."""
    if value > UNPREDICTED_PERPLEXITY:
        return f"not predicted (> {UNPREDICTED_PERPLEXITY:,.0f})"
    return f"{value:.2f}"


def define_flags() -> None:
    """The flags train.py, sft.py and dpo.py share for looking inside a run (train.define_flags)."""
    flags.DEFINE_string("profile_steps", "", "START:END: an XLA trace (jax.profiler) of the steps that take "
                        "the run from step START to step END (the log's steps START+1..END), e.g. 3:5. A "
                        "process's first step compiles and is never traced: after a resume inside the "
                        "window, the rest of it is traced; after one past END, nothing.")
    flags.DEFINE_string("profile_dir", None, "Where --profile_steps writes (TensorBoard's plugins/profile "
                        "layout); default METRICS_DIR/profile.")
    flags.DEFINE_bool("profile_all_hosts", False, "Trace on every process, not only process 0.")
    flags.DEFINE_string("wandb_project", None, "Also log to this Weights & Biases project (pip install "
                        "wandb; WANDB_MODE=offline writes METRICS_DIR/wandb only, for `wandb sync`).")
    flags.DEFINE_string("wandb_entity", None, "W&B team or user (default: your W&B default entity).")
    flags.DEFINE_string("wandb_run_name", None, "W&B display name (default: W&B's).")


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    """Trace the steps that take the run from step `start` to step `end` into `directory`."""
    start: int
    end: int
    directory: str
    all_hosts: bool = False


def profile_config(steps: str, directory: str, all_hosts: bool) -> ProfileConfig | None:
    """--profile_steps=START:END (0 <= START < END) and its companions; None without it."""
    if not steps:
        return None
    start, _, end = steps.partition(":")
    try:
        config = ProfileConfig(int(start), int(end), directory, all_hosts)
    except ValueError:
        config = None
    if config is None or not 0 <= config.start < config.end:
        raise ValueError(f"--profile_steps={steps}: expected START:END, two steps with 0 <= START < END (e.g. 3:5)")
    return config


@dataclasses.dataclass(frozen=True)
class WandbConfig:
    """--wandb_project, --wandb_entity, --wandb_run_name."""
    project: str
    entity: str | None = None
    name: str | None = None


def check_writable(directory: str, flag: str) -> None:
    """Fail before any compute when `directory` cannot hold the run's output."""
    if "://" in directory:
        return  # Orbax reports an unwritable bucket on the first save's metadata write, at start
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise ValueError(f"{flag}={directory} is not writable: {e.strerror or e}") from e


def keep_metrics_until(path: str, step: int) -> None:
    """Drop metrics.jsonl records after `step`: a resumed or rolled-back run logs them again."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(kept)


STEP_METRICS = ("loss", "grad_norm", "skipped", "supervised_tokens", "stop", "lr")

# Where a logging interval's wall time goes. The loop times MEASURED; host work (assembling and
# sending the batch, the logger, the progress bar, a trace's start and stop) is the rest.
MEASURED = ("data_wait", "step", "checkpoint", "eval")
PHASES = ("data_wait", "step", "host", "checkpoint", "eval")
LABELS = {"data_wait": "data wait", "step": "step", "host": "host", "checkpoint": "checkpoint", "eval": "eval"}
ADVICE = {
    "step": "the devices were busy, as they should be: to make each step faster, trace a few steps "
            "(--profile_steps) and see \"My MFU is low\" in docs/training.md",
    "data_wait": "the input stream did not keep up",
    "host": "the host kept the chips idle between steps (batch assembly and transfer, logging): a trace "
            "(--profile_steps) shows the gaps",
    "checkpoint": "saves blocked training: checkpoint less often (--checkpoint_every)",
    "eval": "evaluate less often or on less (--eval_every, --eval_batches, --eval_limit)",
}
DATA_WAIT_ADVICE = ("read the shards from the hosts' region or a local disk, prepare them with a larger "
                    "--block_records (fewer, larger reads), or prefetch more batches (stream.py's "
                    "iterate(prefetch=...) and read_threads)")


class PhaseTimes:
    """Seconds the loop spends in each of MEASURED, summed until the logger takes them."""

    def __init__(self):
        self.seconds = dict.fromkeys(MEASURED, 0.0)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - started

    def take(self) -> dict[str, float]:
        taken, self.seconds = self.seconds, dict.fromkeys(MEASURED, 0.0)
        return taken


def mfu_text(mfu: float, peak_flops: float) -> str:
    """'MFU 41.3%'; above 100% the peak it divides by is wrong, and the line says so instead."""
    if mfu <= 1 or not np.isfinite(mfu):
        return f"MFU {mfu:.1%}"
    return (f"MFU n/a (over 100% of {peak_flops / 1e12:.3g} TFLOP/s: that peak is stale or wrong; "
            "--peak_tflops, or delete ~/.cache/julian/cpu_peak_flops.json to measure it again)")


class IntervalLogger:
    """Every `every` steps: one console line, one metrics.jsonl record, TensorBoard scalars and,
    given a W&B run, the same to W&B (step, loss, lr, grad norm, tokens/s, MFU, ETA, where the time
    went). The clock starts after the first step of this process, which includes compilation."""

    def __init__(self, metrics_dir: str, every: int, steps: int,
                 tokens_per_step: int, flops_per_step: float, peak_flops: float, wandb_run=None):
        from tensorboardX import SummaryWriter

        self.path = os.path.join(metrics_dir, "metrics.jsonl")
        self.file = open(self.path, "a")
        self.tensorboard = SummaryWriter(os.path.join(metrics_dir, "tb"))
        self.wandb = wandb_run
        self.every, self.steps = every, steps
        self.tokens_per_step, self.flops_per_step, self.peak_flops = tokens_per_step, flops_per_step, peak_flops
        self.pending: list[dict] = []
        self.clock, self.clock_step, self.last_step = None, 0, 0
        self.totals = dict.fromkeys(PHASES, 0.0)

    def restart(self, step: int) -> None:
        """Forget the open interval (after a rollback to `step`)."""
        self.file.close()
        keep_metrics_until(self.path, step)
        self.file = open(self.path, "a")
        self.pending, self.clock = [], None

    def log(self, step: int, metrics: dict, times: PhaseTimes, extra: dict, last: bool = False) -> str | None:
        """Record the metrics of the step that ends at `step`; return a line when an interval ends
        (or, `last`, when this process stops: the steps since the previous record are kept).
        `times` holds the loop's phases since the previous call that ended an interval."""
        self.pending.append(metrics)
        if self.clock is None:
            self.clock, self.clock_step = time.perf_counter(), step
            times.take()  # this process's first step (compilation) or a rollback's restore: no interval's
        if step % self.every and step != self.steps and not last:
            return None
        now, timed = time.perf_counter(), step - self.clock_step
        seconds_per_step = (now - self.clock) / timed if timed else float("nan")
        spent = times.take()
        spent["host"] = max(now - self.clock - sum(spent.values()), 0.0)
        for phase in PHASES:
            self.totals[phase] += spent[phase]
        good = [m for m in self.pending if not m["skipped"]] or self.pending
        record = {"step": step,
                  "loss": float(np.mean([m["loss"] for m in good])),
                  "lr": float(good[-1]["lr"]),  # the step's own: what its update applied
                  "grad_norm": float(good[-1]["grad_norm"]),
                  "tokens_per_s": self.tokens_per_step / seconds_per_step,
                  "mfu": self.flops_per_step / seconds_per_step / self.peak_flops,
                  "time": time.time(),
                  "eta_s": seconds_per_step * (self.steps - step),
                  **{f"{phase}_s": spent[phase] for phase in PHASES},
                  **{f"{phase}_fraction": spent[phase] / (now - self.clock) if timed else 0.0 for phase in PHASES},
                  "supervised_tokens": float(np.mean([m["supervised_tokens"] for m in self.pending])),
                  **extra}
        # The loss function's own metrics (dpo.py's rewards/...), averaged like the loss.
        own = [k for k in metrics if k not in STEP_METRICS]
        record.update({k: float(np.mean([m[k] for m in good])) for k in own})
        self.write(record)
        self.pending, self.clock, self.clock_step = [], now, step
        line = (f"step {step:>7} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                f"grad norm {record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tok/s | "
                f"{mfu_text(record['mfu'], self.peak_flops)} | ETA {record['eta_s'] / 60:.1f} min")
        if "epoch" in extra:
            line += f" | epoch {extra['epoch']:.2f}"
        if extra.get("skipped_steps"):
            line += f" | {extra['skipped_steps']} skipped"
        line += "".join(f" | {k} {record[k]:.3f}" for k in own)
        return line + " | " + ", ".join(f"{LABELS[p]} {spent[p]:.2f} s ({record[f'{p}_fraction']:.0%})"
                                         for p in PHASES if p != "eval" or spent[p])

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for name, value in record.items():
            if name not in ("step", "time") and isinstance(value, (int, float)) and np.isfinite(value):
                self.tensorboard.add_scalar(f"train/{name}", value, record["step"])
        if self.wandb is not None:
            # Charts use "step" as their x axis (open_wandb): resumed and rolled-back runs log
            # steps again, which W&B's own step counter, only ever increasing, would drop.
            logged = {k: v for k, v in record.items() if k not in ("event", "from_step", "time")}
            if "event" in record:  # event/resume: the step resumed at; event/rollback: the step rolled back from
                logged[f"event/{record['event']}"] = record.get("from_step", record["step"])
            self.wandb.log(logged)
        self.last_step = record["step"]

    def summary(self) -> str | None:
        """Which phase took most of this process's logged time, and what to change; None before
        the first interval."""
        total = sum(self.totals.values())
        if not total:
            return None
        shares = {phase: self.totals[phase] / total for phase in PHASES}
        top = max(shares, key=shares.get)
        text = (f"where the time went: {LABELS[top]} dominated ("
                + ", ".join(f"{LABELS[p]} {shares[p]:.0%}" for p in sorted(PHASES, key=shares.get, reverse=True))
                + f"): {ADVICE[top]}.")
        if shares["data_wait"] > 0.05:
            text += (f" Waiting for data took {shares['data_wait']:.0%} of the time (over 5%): "
                     f"{DATA_WAIT_ADVICE}.")
        return text

    def plot(self, png_path: str, title: str) -> None:
        """loss.png (plot_loss), also sent to W&B."""
        plot_loss(self.path, png_path, title)
        if self.wandb is not None:
            import wandb

            self.wandb.log({"step": self.last_step, "loss_curve": wandb.Image(png_path)})

    def close(self, failed: bool = False) -> None:
        self.file.close()
        self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)


def open_wandb(settings: WandbConfig, output_dir: str, metrics_dir: str, config: dict):
    """The W&B run of the training run in `output_dir`, created or continued: its id is kept in
    OUTPUT_DIR/wandb_run.json, so the same command after a preemption appends to the same W&B
    run. W&B's local files go to METRICS_DIR/wandb."""
    try:
        import wandb  # optional (requirements-dev.txt): only with --wandb_project
    except ImportError:
        raise ValueError(f"--wandb_project={settings.project} needs the wandb package: pip install wandb") from None

    id_path = storage.join(output_dir, "wandb_run.json")
    storage.write_bytes(id_path, json.dumps({"id": uuid.uuid4().hex[:12]}).encode(), exclusive=True)
    run = wandb.init(project=settings.project, entity=settings.entity, name=settings.name,
                     id=storage.read_json(id_path)["id"], resume="allow", dir=metrics_dir, config=config)
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


class ProfileWindow:
    """An XLA trace (jax.profiler) of the steps `config` names, taken at most once per process:
    on process 0 (`primary`), or on all with config.all_hosts. The process's first step, which
    compiles, is never traced: a process that starts at step `first` traces from
    max(config.start, first + 1)."""

    def __init__(self, config: ProfileConfig | None, first: int, primary: bool):
        traced = config is not None and (primary or config.all_hosts)
        self.directory = config.directory if traced else ""
        self.start, self.end = (max(config.start, first + 1), config.end) if traced else (0, 0)
        self.tracing, self.done, self.traced = False, False, []

    @contextlib.contextmanager
    def step(self, step: int):
        """Around the step that takes the state from `step` to `step + 1`, annotated with its
        number as the log counts it, so that the profile plugin splits the trace by step."""
        if step == self.start < self.end and not self.done:
            jax.profiler.start_trace(self.directory)
            self.tracing = True
        with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
            yield
        if self.tracing:
            self.traced.append(step + 1)
            if step + 1 >= self.end:
                self.close()

    def close(self) -> None:
        """Ends the trace (at the window's end, or when the loop stops inside it)."""
        if not self.tracing:
            return
        jax.profiler.stop_trace()
        self.tracing, self.done = False, True  # never again, even when a rollback brings the step back
        tqdm.write(f"trace of steps {min(self.traced, default=self.start)}..{max(self.traced, default=self.start)} "
                   f"written to {self.directory}: tensorboard --logdir={self.directory}, or a "
                   "plugins/profile/*/*.trace.json.gz in ui.perfetto.dev")


def plot_loss(metrics_path: str, png_path: str, title: str = "julian pretraining") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_path) as f:
        records = [json.loads(line) for line in f]
    fig, ax = plt.subplots(figsize=(6, 4))
    train = [r for r in records if "loss" in r]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="training")
    held_out = [r for r in records if "eval_loss" in r]
    if held_out:
        ax.plot([r["step"] for r in held_out], [r["eval_loss"] for r in held_out], "o-", label="held out")
    # A resume or rollback explains a jump in the curve: a dashed line, labelled, at its step.
    marks = {(r["step"], f"rolled back to {r['step']} (from {r['from_step']})" if r["event"] == "rollback"
              else f"resumed at {r['step']}") for r in records if "event" in r}
    for step, label in sorted(marks):
        color = "tab:red" if label.startswith("rolled") else "tab:green"
        ax.axvline(step, color=color, linestyle="--", linewidth=1)
        ax.annotate(label, (step, 1), xycoords=("data", "axes fraction"), xytext=(-3, -4),
                    textcoords="offset points", rotation=90, ha="right", va="top", fontsize=7, color=color)
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
