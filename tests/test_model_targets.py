"""layer_ops.py's attention follows the mesh a program is built for, not the host's backend: every jitted
program we ship, compiled on this CPU for a TPU v4-8 (XLA:TPU from libtpu, ahead of time), runs the
Mosaic splash attention kernels where attention is causal within segments (training, SFT, DPO's
step and reference pass, the held-out loss), and XLA's own dots where it is not (evaluation's
prefix trees, KV-cache decoding)."""

import dataclasses
import os
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

import chat_data
import dpo
import pair_packing
from model import ModelConfig, Transformer, init_cache
from parallel import AXES, batch_sharding
from optim import TrainConfig
from train_step import compile_step, held_out_step

pytest.importorskip("libtpu", reason="libtpu (requirements-dev.txt) is not installed: no XLA:TPU to compile with")
# XLA:TPU compiles, 15-60 s each on a 2-core CPU: the slow tier, which .ci/run runs too.
pytestmark = pytest.mark.slow

# Another process (a second test run, a dry run) may hold libtpu's lock: compiling needs no chip.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# configs/tiny.flags' model and batch, with its default attention (auto) and remat (none).
TINY = ModelConfig(vocab_size=4096, d_model=192, n_layers=4, n_heads=3, d_ff=512, max_seq_len=128,
                   scan_layers=False, attention="auto")
TINY_TRAIN = TrainConfig(steps=10, batch_size=8, warmup_steps=1)
SPLASH = {"fwd", "dq", "dkv"}


def v4_8_mesh() -> Mesh:
    from jax.experimental import topologies

    # "megacore": one device per v4 chip (its two cores together), as a v4 slice runs.
    topology = topologies.get_topology_desc(topology_name="v4:2x2x1", platform="tpu", chip_config_name="megacore")
    return Mesh(np.array(topology.devices).reshape(-1, 1), AXES)


def splash_kernels(text: str) -> set[str]:
    return set(re.findall(r"splash_mha_(fwd|dq|dkv)", text))


def placed(tree, sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def abstract_model(config: ModelConfig, sharding) -> Transformer:
    return placed(eqx.filter_eval_shape(Transformer, config, jax.random.key(0)), sharding)


def abstract_batch(row: dict[str, jax.ShapeDtypeStruct], rows: int, mesh: Mesh) -> dict:
    """A [1, rows, ...] global batch of `row`s, split over the mesh as parallel.global_batch's."""
    return {name: jax.ShapeDtypeStruct((1, rows, *x.shape), x.dtype, sharding=batch_sharding(mesh))
            for name, x in row.items()}


def test_the_tiny_train_step_compiled_for_a_tpu_v4_8_on_a_cpu_runs_the_mosaic_splash_kernels():
    text = compile_step(TINY, TINY_TRAIN, v4_8_mesh()).as_text()
    assert splash_kernels(text) == SPLASH, f"splash kernels compiled: {sorted(splash_kernels(text))}"
    assert "tpu_custom_call" in text  # Mosaic, not the interpreter's loops of XLA ops


def test_a_grouped_query_train_step_compiled_for_a_tpu_v4_8_runs_splash_on_unrepeated_kv_heads():
    """4 query heads on 2 K/V heads: the MHA splash kernel takes the K/V heads as they are."""
    gqa = dataclasses.replace(TINY, d_model=256, n_heads=4, n_kv_heads=2, tie_embeddings=True, n_layers=2)
    text = compile_step(gqa, TINY_TRAIN, v4_8_mesh()).as_text()
    assert splash_kernels(text) == SPLASH, f"splash kernels compiled: {sorted(splash_kernels(text))}"
    assert "tpu_custom_call" in text


def test_every_other_program_we_ship_compiles_for_a_v4_8_with_the_attention_its_rows_call_for():
    """The train step is the test above's."""
    mesh = v4_8_mesh()
    replicated = NamedSharding(mesh, P())
    pair_row = pair_packing.pair_row(TINY.max_seq_len)
    texts = {
        "sft": compile_step(TINY, TINY_TRAIN, mesh, row=chat_data.chat_row(TINY.max_seq_len)).as_text(),
        "dpo step": compile_step(TINY, TINY_TRAIN, mesh, loss_fn=dpo.make_loss_fn(dpo.LossConfig()),
                                 row=pair_row).as_text(),
        # Before the mesh was passed, this pass (jitted without it) called the kernel on the whole
        # batch: XLA cannot split a Mosaic call over the 4 chips (issue 28).
        "dpo reference pass": dpo._reference_forward(mesh).lower(
            abstract_model(TINY, replicated),
            abstract_batch({k: v for k, v in pair_row.items() if k != "reference_logps"}, 8, mesh)).compile().as_text(),
        "held-out loss": held_out_step(mesh).lower(
            abstract_model(TINY, replicated),
            abstract_batch({"tokens": jax.ShapeDtypeStruct((TINY.max_seq_len + 1,), jnp.int32)}, 8, mesh)
        ).compile().as_text(),
    }
    for name, text in texts.items():
        assert splash_kernels(text) >= {"fwd"}, f"{name}: splash kernels {sorted(splash_kernels(text))}"
        assert "tpu_custom_call" in text, name
    for name in ("sft", "dpo step"):  # and their backward passes
        assert splash_kernels(texts[name]) == SPLASH, name

    # Evaluation scores prefix trees (continuations branch from a shared context: an explicit
    # mask, which no kernel takes) and decoding attends to a KV cache: XLA's dots, one chip each.
    import generate
    import packed_scoring

    chip = mesh.devices.flat[0]
    one = SingleDeviceSharding(chip)
    scoring = packed_scoring.compile_scoring(TINY, 4, TINY.max_seq_len, chip).as_text()
    model = abstract_model(TINY, one)
    layers = placed(eqx.filter_eval_shape(Transformer.layers, model), one)
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=one)
    batch = lambda dtype, *shape: jax.ShapeDtypeStruct((2, *shape), dtype, sharding=one)
    sampling = dict(temperature=0.0, top_k=0, top_p=1.0)
    prefill = generate._prefill.lower(model, layers, batch(jnp.int32, 16), batch(jnp.int32),
                                      scalar(jax.random.key(0).dtype), size=64, **sampling).compile().as_text()
    cache = placed(jax.eval_shape(lambda: init_cache(TINY, 2, 64)), one)
    decode = generate._decode.lower(model, layers, cache, batch(jnp.int32), batch(jnp.bool_),
                                    scalar(jax.random.key(0).dtype), scalar(jnp.int32), scalar(jnp.int32),
                                    jax.ShapeDtypeStruct((1,), jnp.int32, sharding=one), **sampling).compile().as_text()
    for name, text in (("scoring", scoring), ("prefill", prefill), ("decode", decode)):
        assert not splash_kernels(text) and "tpu_custom_call" not in text, name
        assert "convolution" in text or "dot(" in text, name  # attention and projections as XLA dots
