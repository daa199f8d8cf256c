"""model.py's kernels follow the devices a program is compiled for, not the host's backend: the
tiny config's train step, compiled on this CPU for a TPU v4-8 (XLA:TPU from libtpu, ahead of
time), holds the Mosaic splash attention kernels, forward and backward."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from model import ModelConfig
from parallel import AXES, batch_sharding, shardings
from train import TrainConfig, abstract_state, make_optimizer, make_train_step

pytest.importorskip("libtpu", reason="libtpu (requirements-dev.txt) is not installed: no XLA:TPU to compile with")

# Another process (a second test run, a dry run) may hold libtpu's lock: compiling needs no chip.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# configs/tiny.flags' model and batch, with its default attention (auto) and remat (none).
TINY = ModelConfig(vocab_size=4096, d_model=192, n_layers=4, n_heads=3, d_ff=512, max_seq_len=128,
                   scan_layers=False, attention="auto")
TINY_BATCH = 8


def v4_8_mesh() -> Mesh:
    from jax.experimental import topologies

    # "megacore": one device per v4 chip (its two cores together), as a v4 slice runs.
    topology = topologies.get_topology_desc(topology_name="v4:2x2x1", platform="tpu", chip_config_name="megacore")
    return Mesh(np.array(topology.devices).reshape(-1, 1), AXES)


def compiled_train_step(model_config: ModelConfig, mesh: Mesh) -> str:
    """The text of the train step compiled for `mesh`'s devices, from abstract shapes only."""
    optimizer = make_optimizer(TrainConfig(steps=10, batch_size=TINY_BATCH, warmup_steps=1))
    state = abstract_state(model_config, optimizer, mesh)
    tokens = jax.ShapeDtypeStruct((1, TINY_BATCH, model_config.max_seq_len + 1), jnp.int32,
                                  sharding=batch_sharding(mesh))
    return make_train_step(optimizer, shardings(state), mesh).lower(
        state, {"tokens": tokens}, jax.random.key(0), jax.ShapeDtypeStruct((), jnp.int32),
        jax.ShapeDtypeStruct((), jnp.bool_), jax.ShapeDtypeStruct((mesh.size,), jnp.bool_)).compile().as_text()


def test_the_tiny_train_step_compiled_for_a_tpu_v4_8_on_a_cpu_runs_the_mosaic_splash_kernels():
    text = compiled_train_step(TINY, v4_8_mesh())
    kernels = set(re.findall(r"splash_mha_(fwd|dq|dkv)", text))
    assert kernels == {"fwd", "dq", "dkv"}, f"splash kernels compiled: {sorted(kernels)}"
    assert "tpu_custom_call" in text  # Mosaic, not the interpreter's loops of XLA ops


def test_a_grouped_query_train_step_compiled_for_a_tpu_v4_8_runs_splash_on_unrepeated_kv_heads():
    """4 query heads on 2 K/V heads: the MHA splash kernel takes the K/V heads as they are."""
    import dataclasses

    gqa = dataclasses.replace(TINY, d_model=256, n_heads=4, n_kv_heads=2, tie_embeddings=True, n_layers=2)
    text = compiled_train_step(gqa, v4_8_mesh())
    kernels = set(re.findall(r"splash_mha_(fwd|dq|dkv)", text))
    assert kernels == {"fwd", "dq", "dkv"}, f"splash kernels compiled: {sorted(kernels)}"
    assert "tpu_custom_call" in text
