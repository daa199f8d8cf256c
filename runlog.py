"""A run's record: the output check at start, metrics.jsonl, TensorBoard, the console line and
the loss curve.

Every --log_every steps, one console line, one metrics.jsonl record and TensorBoard scalars (step,
loss, lr, grad norm, tokens/s, MFU, ETA, time waiting for data); resumes and rollbacks are
records too, and loss.png marks them.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np
import optax


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


STEP_METRICS = ("loss", "grad_norm", "skipped", "supervised_tokens", "stop")


class IntervalLogger:
    """Every `every` steps: one console line, one metrics.jsonl record and TensorBoard scalars
    (step, loss, lr, grad norm, tokens/s, MFU, ETA, time waiting for data). The clock starts
    after the first step of this process, which includes compilation."""

    def __init__(self, metrics_dir: str, every: int, steps: int, schedule: optax.Schedule,
                 tokens_per_step: int, flops_per_step: float, peak_flops: float):
        from tensorboardX import SummaryWriter

        self.path = os.path.join(metrics_dir, "metrics.jsonl")
        self.file = open(self.path, "a")
        self.tensorboard = SummaryWriter(os.path.join(metrics_dir, "tb"))
        self.every, self.steps, self.schedule = every, steps, schedule
        self.tokens_per_step, self.flops_per_step, self.peak_flops = tokens_per_step, flops_per_step, peak_flops
        self.pending: list[dict] = []
        self.clock, self.clock_step, self.data_wait = None, 0, 0.0

    def restart(self, step: int) -> None:
        """Forget the open interval (after a rollback to `step`)."""
        self.file.close()
        keep_metrics_until(self.path, step)
        self.file = open(self.path, "a")
        self.pending, self.clock = [], None

    def log(self, step: int, metrics: dict, data_wait: float, extra: dict, last: bool = False) -> str | None:
        """Record the metrics of the step that ends at `step`; return a line when an interval ends
        (or, `last`, when this process stops: the steps since the previous record are kept)."""
        self.pending.append(metrics)
        self.data_wait += data_wait
        if self.clock is None:
            self.clock, self.clock_step, self.data_wait = time.perf_counter(), step, 0.0
        if step % self.every and step != self.steps and not last:
            return None
        now, timed = time.perf_counter(), step - self.clock_step
        seconds_per_step = (now - self.clock) / timed if timed else float("nan")
        good = [m for m in self.pending if not m["skipped"]] or self.pending
        record = {"step": step,
                  "loss": float(np.mean([m["loss"] for m in good])),
                  "lr": float(self.schedule(step - 1)),
                  "grad_norm": float(good[-1]["grad_norm"]),
                  "tokens_per_s": self.tokens_per_step / seconds_per_step,
                  "mfu": self.flops_per_step / seconds_per_step / self.peak_flops,
                  "time": time.time(),
                  "eta_s": seconds_per_step * (self.steps - step),
                  "data_wait_fraction": self.data_wait / (now - self.clock) if timed else 0.0,
                  "supervised_tokens": float(np.mean([m["supervised_tokens"] for m in self.pending])),
                  **extra}
        # The loss function's own metrics (dpo.py's rewards/...), averaged like the loss.
        own = [k for k in metrics if k not in STEP_METRICS]
        record.update({k: float(np.mean([m[k] for m in good])) for k in own})
        self.write(record)
        self.pending, self.clock, self.clock_step, self.data_wait = [], now, step, 0.0
        line = (f"step {step:>7} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                f"grad norm {record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tok/s | "
                f"MFU {record['mfu']:.1%} | ETA {record['eta_s'] / 60:.1f} min")
        if "epoch" in extra:
            line += f" | epoch {extra['epoch']:.2f}"
        if extra.get("skipped_steps"):
            line += f" | {extra['skipped_steps']} skipped"
        return line + "".join(f" | {k} {record[k]:.3f}" for k in own)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for name, value in record.items():
            if name not in ("step", "time") and isinstance(value, (int, float)) and np.isfinite(value):
                self.tensorboard.add_scalar(f"train/{name}", value, record["step"])

    def close(self) -> None:
        self.file.close()
        self.tensorboard.close()


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
