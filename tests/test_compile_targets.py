"""`--dry_run --hardware=NAME` compiles for NAME's own chips on this CPU (budget.py): XLA:TPU from
libtpu for a TPU slice, with its memory figures, its Mosaic kernels and a verdict that was itself
compiled. layer_ops.py's side (kernels follow the mesh, dots saves matmul outputs) is tested in
tests/test_model_targets.py; here, what a user reads."""

import dataclasses
import re

import pytest

import budget
import live_buffers
from conftest import run_script
from model import ModelConfig, num_params
from parallel import make_mesh
from optim import TrainConfig
from train_step import compile_step

pytest.importorskip("libtpu", reason="libtpu (requirements-dev.txt) is not installed: no XLA:TPU to compile with")
# XLA:TPU compiles, 10-80 s each on a 2-core CPU: the slow tier, which .ci/run runs too.
pytestmark = pytest.mark.slow

# configs/tiny.flags' batch.
TINY_TRAIN = TrainConfig(steps=300, batch_size=8, warmup_steps=30)


def printed_rows(out: str) -> dict[str, str]:
    """A dry run's printout as {label: value}."""
    return dict(re.match(r"(.+?)\s{2,}(.*)", line).groups() for line in out.splitlines() if "  " in line)


def dry_run(*flags: str) -> dict[str, str]:
    """train.py --flagfile=configs/tiny.flags --dry_run FLAGS..., as rows {label: value}."""
    return printed_rows(run_script("train.py", "--flagfile=configs/tiny.flags", "--dry_run", *flags).stdout)


def gib(text: str) -> float:
    number, unit = re.match(r"-?([\d.]+) (GiB|MiB)", text).groups()
    return float(number) / (1024 if unit == "MiB" else 1)


def test_tiny_dry_run_for_a_v4_8_prints_xla_tpu_figures_the_splash_kernels_and_fits():
    rows = dry_run("--hardware=v4-8")
    assert rows["compiled for"] == "v4-8: XLA:TPU for 4 x TPU v4"
    assert rows["attention, remat"] == "splash, none"  # --attention=auto on a TPU
    for kernel in ("splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv"):  # forward and backward
        assert kernel in rows["fused kernels"]
    figures = {k.removeprefix("per-chip memory: "): gib(v) for k, v in rows.items() if k.startswith("per-chip memory")}
    peak = figures["arguments"] + figures["outputs"] - figures["aliased"] + figures["temporaries"]
    assert figures["peak"] == pytest.approx(peak, abs=0.02)
    assert rows["verdict (one chip)"].startswith(f"fits: {figures['peak']:.1f} GiB of 32 GiB per chip")
    # What is live at the peak, from XLA's buffer assignment, by group, adding up to the whole: the
    # fp32 parameters (the donated ones XLA has finished reading are not), the bf16 Adam moments.
    n = num_params(ModelConfig(vocab_size=4096, d_model=192, n_layers=4, n_heads=3, d_ff=512))
    assert 0 < gib(rows["  parameters"]) <= 4 * n / 2**30 * 1.01
    # The bf16 moments, and at most one copy of them in flight (an input moment still read while its
    # update is written beside it: 14.5 MiB here against 12.8 MiB of moments).
    assert 2 * 2 * n / 2**30 * 0.5 < gib(rows["  optimizer state"]) <= 2 * 2 * 2 * n / 2**30
    groups = sum(gib(v) for k, v in rows.items() if k.strip() in live_buffers.BUFFER_GROUPS and k.startswith("  "))
    assert groups == pytest.approx(gib(rows["live at the peak"]), rel=0.02)
    assert rows["  largest #1"]


def test_dots_keeps_the_matmul_outputs_that_full_recomputes_in_the_program_compiled_for_a_v4_8():
    model_config = ModelConfig(vocab_size=256, d_model=128, n_layers=1, n_heads=2, d_ff=512, max_seq_len=256,
                               scan_layers=False, attention="splash")
    mesh = make_mesh(1, budget.target_devices("v4-8"))
    # The matmuls of the compiled program (XLA:TPU's convolutions): full recomputes the forward's
    # that dots keeps (at 600m on a v4-32 dots holds 4.6 GiB of them in bf16: benchmarks/README.md).
    matmuls = {remat: compile_step(dataclasses.replace(model_config, remat=remat), TINY_TRAIN, mesh).as_text().count(
                   " convolution(") for remat in ("full", "dots")}
    assert matmuls["full"] > matmuls["dots"] > 0, matmuls


def test_a_step_that_cannot_fit_a_v4_chip_is_refused_in_one_line_naming_the_flag_that_fits():
    # 4.4B parameters and their Adam state replicated on every chip: over 32 GiB before any
    # activation; sharded over the slice's 4 chips they fit.
    rows = dry_run("--hardware=v4-8", "--d_model=8192", "--d_ff=32768", "--n_heads=64", "--n_layers=4",
                   "--scan_layers=true", "--remat=full")
    verdict = rows["verdict (one chip)"]
    assert verdict.startswith("does NOT fit: ") and "--fsdp=4" in verdict and verdict.endswith("and fits")
    fitted = float(re.search(r"it needs ([\d.]+) GiB and fits", verdict).group(1))
    assert fitted <= budget.FIT_FRACTION * 32


def test_evaluate_dry_run_compiles_the_largest_scoring_pass_for_one_v4_chip(tiny_run):
    rows = printed_rows(run_script("evaluate.py", f"--checkpoint={tiny_run}", "--dry_run", "--hardware=v4-8").stdout)
    assert rows["compiled for"].startswith("v4-8: XLA:TPU for 4 x TPU v4")
    # --batch_size=16 on an accelerator: 16 x 256 tokens in rows of the tiny model's 128.
    assert rows["scoring pass"].startswith("32 rows x 128 tokens")
    assert gib(rows["per-chip memory: arguments"]) * 2**30 >= 4 * 3_344_064  # fp32 parameters
    assert rows["verdict (one chip)"].startswith("fits")


def test_dpo_dry_run_compiles_the_pair_step_for_a_v4_8_and_writes_nothing(tiny_run, tmp_path):
    rows = printed_rows(run_script(
        "dpo.py", "--flagfile=configs/dpo_tiny.flags", f"--init_from={tiny_run}", f"--output_dir={tmp_path}/never",
        "--train_data=samples/preference/en_hh_rlhf_sample100_pairs.jsonl", "--dry_run", "--hardware=v4-8").stdout)
    assert rows["compiled for"] == "v4-8: XLA:TPU for 4 x TPU v4"
    assert "splash_mha_fwd" in rows["fused kernels"] and rows["verdict (one chip)"].startswith("fits")
    assert not (tmp_path / "never").exists()


def test_fsdp_gathers_each_layers_weights_in_bf16_inside_the_layer_scan_never_the_whole_model():
    # configs/tiny.flags' shape, scanned, its state sharded over a v4-8's 4 chips.
    model_config = ModelConfig(vocab_size=4096, d_model=192, n_layers=4, n_heads=3, d_ff=512, max_seq_len=128,
                               scan_layers=True, remat="full", attention="splash")
    compiled = compile_step(model_config, TINY_TRAIN, make_mesh(4, budget.target_devices("v4-8")))
    gathered = [re.match(r"\s*%?\S+ = (\(?[^ ]+) all-gather", line).group(1)
                for line in compiled.as_text().splitlines() if re.match(r"\s*%?\S+ = \(?[^ ]+ all-gather(-start)?\(", line)]
    shapes = [(dtype, tuple(int(d) for d in dims.split(","))) for text in gathered
              for dtype, dims in re.findall(r"(\w+)\[([\d,]+)\]", text)]
    layer = {(192, 192), (192, 512), (512, 192)}  # one layer's matrices, whole ([1, ...]: the scan's slice)
    matrices = [(dtype, dims[-2:]) for dtype, dims in shapes if dims[-2:] in layer and dims[:-2] in ((), (1,))]
    assert {dims for dtype, dims in matrices if dtype == "bf16"} == layer, shapes
    # No gather of the stacked blocks (a leading axis of 4 layers), nor of a layer's matrix in fp32.
    assert not [s for s in shapes if s[0] in ("f32", "bf16") and len(s[1]) == 3 and s[1][0] == model_config.n_layers], shapes
    assert all(dtype == "bf16" for dtype, _ in matrices), shapes
