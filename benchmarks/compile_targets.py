"""Our programs compiled on this CPU for the chips they will run on, in one table: XLA:TPU (libtpu)
and XLA:GPU (the CUDA plugin with configs/gpu/'s target configs), as `--dry_run --hardware=NAME`
compiles them (budget.py), each row one compile.

    python benchmarks/compile_targets.py                        # every row (~35 s per 600m compile, idle CPU)
    python benchmarks/compile_targets.py --rows=600m-v4-32,2b   # rows whose name starts so

Rows: the 600m pretraining step on a v4-32 for each attention x remat; the 250m on a v4-32 and
the 2B (configs/2b.flags, FSDP over 64 chips) on a v6e-64 for each remat, and the 7B
(configs/7b.flags) there for the policies between full and dots (the flagfiles' remat defaults
are chosen from these); the 600m on 8 H100s and on one H200 (flash); the SFT and DPO
steps of the 600m on a v4-32 (configs/sft_600m.flags: 128 packed rows of 2,048; dpo_600m.flags:
64 pairs of 1,024, stored reference log-probabilities); the 600m evaluation scoring pass on one
v4 chip (a report-task pass at the default --batch_size on an accelerator: 2 rows of 2,048, every
position scored, which bounds the real passes). All at the flagfiles' batch: 4 sequences per chip
for pretraining. Columns: XLA's per-chip memory (arguments, outputs, aliased, temporaries, code;
peak = arguments + outputs - aliased + temporaries), the fused kernels, compile seconds, and
whether the peak fits 90% of the chip (budget.FIT_FRACTION); then, from XLA's buffer assignment,
what is live at each row's peak, by group (live_buffers.BUFFER_GROUPS). Each row is appended to
--output (JSON lines) as it completes, so a run cut short keeps what it compiled.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiling only: the host's backends stay out of it

import budget  # noqa: E402
import chat_data  # noqa: E402
import dpo  # noqa: E402
import live_buffers  # noqa: E402
import packed_scoring  # noqa: E402
import pair_packing  # noqa: E402
import train  # noqa: E402
import train_step  # noqa: E402
from accelerator import model_config  # noqa: E402
from parallel import make_mesh  # noqa: E402

SEQ_LEN = 2048
PER_CHIP = 4  # sequences per chip: the report's 64 on a v4-32's 16 chips


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    program: str  # pretrain, sft, dpo, eval
    size: str
    hardware: str
    attention: str
    remat: str
    fsdp: int = 1


def rows() -> list[Row]:
    out = [Row(f"600m-v4-32-splash-{r}", "pretrain", "600m", "v4-32", "splash", r) for r in ("dots", "full", "none")]
    out += [Row(f"250m-v4-32-splash-{r}", "pretrain", "250m", "v4-32", "splash", r) for r in ("dots", "full", "none")]
    out += [Row(f"2b-v6e-64-splash-{r}", "pretrain", "2b", "v6e-64", "splash", r, fsdp=64) for r in ("dots", "full", "none")]
    out += [Row(f"7b-v6e-64-splash-{r}", "pretrain", "7b", "v6e-64", "splash", r, fsdp=64)
            for r in ("dots_except_mlp", "attention", "dots", "full")]
    out += [Row("600m-8xH100-flash-dots", "pretrain", "600m", "8xH100", "flash", "dots"),
            Row("600m-1xH200-flash-dots", "pretrain", "600m", "1xH200", "flash", "dots"),
            Row("sft-600m-v4-32-splash-dots", "sft", "600m", "v4-32", "splash", "dots"),
            Row("sft-600m-v4-32-splash-full", "sft", "600m", "v4-32", "splash", "full"),
            Row("dpo-600m-v4-32-splash-dots", "dpo", "600m", "v4-32", "splash", "dots"),
            Row("eval-600m-v4-32", "eval", "600m", "v4-32", "einsum", "none")]
    out += [Row(f"600m-v4-32-einsum-{r}", "pretrain", "600m", "v4-32", "einsum", r) for r in ("dots", "full", "none")]
    return out


def compile_fn(row: Row, chips: int) -> tuple[budget.CompileFn, train.TrainConfig]:
    """What the row compiles, through the scripts' own functions, and its batch."""
    if row.program == "sft":  # configs/sft_600m.flags: 128 packed rows
        return functools.partial(train_step.compile_step, row=chat_data.chat_row(SEQ_LEN)), train.TrainConfig(
            steps=1000, batch_size=128, warmup_steps=100)
    if row.program == "dpo":  # configs/dpo_600m.flags: 64 pairs of 1,024 tokens, fp32 moments
        loss = dpo.make_loss_fn(dpo.LossConfig("sigmoid", 0.1, 0.0))
        return functools.partial(train_step.compile_step, loss_fn=loss, row=pair_packing.pair_row(1024)), train.TrainConfig(
            steps=1000, batch_size=64, warmup_steps=100, opt_state_dtype="float32")
    if row.program == "eval":  # one chip scores; the evaluation's --batch_size 16 on an accelerator
        passes = 16 * packed_scoring.TOKENS_PER_REQUEST * 4 // SEQ_LEN
        return (lambda m, c, mesh: packed_scoring.compile_scoring(m, passes, SEQ_LEN, mesh.devices.flat[0])), None
    return train_step.compile_step, train.TrainConfig(steps=1000, batch_size=PER_CHIP * chips, warmup_steps=100)


def measure(row: Row) -> dict:
    pod = budget.HARDWARE[row.hardware]
    devices = budget.target_devices(row.hardware)
    if devices is None:
        return {"row": row.name, "note": "compiler not installed"}
    config = model_config(row.size, SEQ_LEN, attention=row.attention, remat=row.remat)
    fn, train_config = compile_fn(row, len(devices))
    mesh = make_mesh(row.fsdp, devices)
    program = budget.compile_program(fn, config, train_config, mesh)
    out = {"row": row.name, "hardware": row.hardware, "chip_gib": pod.memory_gib, "kernels": list(program.kernels),
           "compile_s": round(program.seconds, 1), "refused": program.refused}
    if not program.refused:
        m = program.memory
        out.update(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes, aliased=m.alias_size_in_bytes,
                   temporaries=m.temp_size_in_bytes, code=m.generated_code_size_in_bytes, peak=program.peak,
                   live_peak=program.live_peak,
                   groups={g: size for g, (size, _) in live_buffers.buffer_groups(program.buffers).items()},
                   largest=[dataclasses.asdict(b) for b in program.buffers[:5]])
    out["fits"] = bool(program.peak is not None and program.peak <= budget.FIT_FRACTION * pod.memory_gib * 2**30)
    return out


def table(results: list[dict]) -> str:
    gib = lambda r, k: f"{r[k] / 2**30:.2f}" if k in r else "-"
    lines = ["| row | args | outputs | aliased | temps | code | peak GiB | of chip | kernels | compile s | fits |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |"]
    short = lambda k: k.replace("splash_mha_", "").replace("_segmented", "")
    for r in results:
        if "note" in r:
            lines.append(f"| {r['row']} | {r['note']} |" + " |" * 10)
            continue
        peak = gib(r, "peak") if not r["refused"] else "refused"
        share = f"{r['peak'] / (r['chip_gib'] * 2**30):.0%}" if "peak" in r else "-"
        lines.append(f"| {r['row']} | {gib(r, 'arguments')} | {gib(r, 'outputs')} | {gib(r, 'aliased')} | "
                     f"{gib(r, 'temporaries')} | {gib(r, 'code')} | {peak} | {share} of {r['chip_gib']:g} | "
                     f"{', '.join(short(k) for k in r['kernels']) or 'none'} | {r['compile_s']} | "
                     f"{'yes' if r['fits'] else 'NO'} |")
    return "\n".join(lines)


def buffer_table(results: list[dict]) -> str:
    """Where each row's peak goes: GiB per chip of each group of buffers live at the peak
    (live_buffers.BUFFER_GROUPS, from XLA's buffer assignment), and the largest buffer."""
    groups = [g for g in live_buffers.BUFFER_GROUPS if any(g in r.get("groups", {}) for r in results)]
    lines = [f"| row | live at peak | {' | '.join(groups)} | largest buffer |",
             "| --- | ---: | " + "---: | " * len(groups) + "--- |"]
    for r in results:
        if not r.get("groups"):
            continue
        big = r["largest"][0]
        cells = " | ".join(f"{r['groups'].get(g, 0) / 2**30:.2f}" for g in groups)
        lines.append(f"| {r['row']} | {r['live_peak'] / 2**30:.2f} | {cells} | "
                     f"{big['size'] / 2**30:.2f} GiB {big['shape']} {big['group']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="", help="comma-separated prefixes of row names (default: all)")
    parser.add_argument("--output", default="compile_targets.jsonl", help="results, one JSON line per row")
    parser.add_argument("--table_only", action="store_true", help="print the table of --output; compile nothing")
    args = parser.parse_args()
    if not args.table_only:
        budget.prepare_host("v4-8")
        prefixes = tuple(p for p in args.rows.split(",") if p) or ("",)
        for row in rows():
            if row.name.startswith(prefixes):
                result = measure(row)
                print(json.dumps(result), file=sys.stderr, flush=True)
                with open(args.output, "a") as f:
                    f.write(json.dumps(result) + "\n")
    with open(args.output) as f:
        results = {r["row"]: r for r in map(json.loads, f)}  # the newest run of each row
    done = [results[row.name] for row in rows() if row.name in results]
    print(table(done))
    print()
    print(buffer_table(done))


if __name__ == "__main__":
    main()
