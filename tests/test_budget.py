"""budget.py: the cached CPU peak behind MFU, and the dry run's verdict on whether a step fits a chip."""

import dataclasses
import json
import os

import jax
import pytest

import budget
from budget import FIT_FRACTION, Pod, compile_program, fit_verdict
from model import ModelConfig
from parallel import make_mesh
from optim import TrainConfig
from train_step import compile_step

TINY = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=2, d_ff=128, max_seq_len=32,
                   dtype="float32")


def test_cpu_peak_is_measured_once_per_cpu_model_and_core_count_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = tmp_path / "julian" / "cpu_peak_flops.json"
    key = budget.cpu_key()
    assert str(len(os.sched_getaffinity(0))) in key and key.endswith(", bfloat16")
    measured = budget.device_peak_flops()
    assert measured > 1e9 and json.loads(cache.read_text()) == {key: measured}
    cache.write_text(json.dumps({key: 123e12}))  # the next call reads this, it does not measure
    assert budget.device_peak_flops() == 123e12
    assert budget.device_peak_flops(peak_tflops=2.0) == 2e12 * jax.device_count()  # the flag overrides
    other = budget.cpu_peak_flops(str(cache), key="another CPU, 3 cores")  # another key measures
    assert other != 123e12 and json.loads(cache.read_text()) == {key: 123e12, "another CPU, 3 cores": other}


@pytest.mark.slow  # an XLA:TPU compile per flag tried
def test_dry_run_fit_verdict_names_the_remat_flag_that_makes_a_step_fit():
    model_config = dataclasses.replace(TINY, max_seq_len=256, attention="einsum")
    config = TrainConfig(steps=10, batch_size=8, warmup_steps=1)
    devices, mesh = jax.devices(), make_mesh(1)
    plain = compile_program(compile_step, model_config, config, mesh)
    dots = compile_program(compile_step, dataclasses.replace(model_config, remat="dots"), config, mesh)
    assert dots.peak < plain.peak
    # A chip between the two: the step as configured does not fit, --remat=dots does.
    between = Pod(1, 275.0, (dots.peak + plain.peak) / 2 / FIT_FRACTION / 2**30, "tpu", "")
    verdict = fit_verdict(model_config, config, devices, 1, between, plain, compile_step)
    assert verdict.startswith(f"does NOT fit: needs {plain.peak / 2**30:.1f} GiB per chip") and "with --remat=dots" in verdict
    roomy = Pod(1, 275.0, 2 * plain.peak / FIT_FRACTION / 2**30, "tpu", "")
    assert fit_verdict(model_config, config, devices, 1, roomy, plain, compile_step).startswith("fits")


def test_cpu_peak_is_measured_in_the_runs_compute_dtype_under_a_key_naming_its_isa(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    assert all(isa in budget.cpu_key() for isa in budget.MATMUL_ISA if isa in flags)
    cache = tmp_path / "julian" / "cpu_peak_flops.json"
    cache.parent.mkdir()
    cache.write_text(json.dumps({budget.cpu_key("bfloat16"): 5e12}))  # as a bf16 run left it
    fp32 = budget.device_peak_flops(dtype="float32")  # a fp32 run measures its own, not bf16's
    assert fp32 != 5e12 and json.loads(cache.read_text()) == {budget.cpu_key("bfloat16"): 5e12,
                                                               budget.cpu_key("float32"): fp32}


@pytest.mark.slow  # an XLA:TPU compile per flag tried
def test_fit_verdict_tries_only_a_grad_accum_whose_micro_batches_split_over_the_devices():
    devices = budget.target_devices("v4-8")  # 4 chips, through libtpu
    # Already at full remat, the pod's kernel and --fsdp=4: only --grad_accum is left to try.
    model_config = dataclasses.replace(TINY, max_seq_len=128, attention="splash", remat="full")
    config = TrainConfig(steps=10, batch_size=12, warmup_steps=1)
    program = compile_program(compile_step, model_config, config, make_mesh(4, devices))
    small = Pod(4, 275.0, program.peak / 2 / 2**30, "tpu", "v4:2x2x1")
    # --grad_accum=2 makes micro-batches of 6 rows, which 4 chips cannot split (it raised a
    # sharding error); 4 makes 3, fewer than the chips.
    verdict = fit_verdict(model_config, config, devices, 4, small, program, compile_step)
    assert verdict.endswith("no flag tried makes it fit (micro-batch 12): use a bigger slice or chip"), verdict
