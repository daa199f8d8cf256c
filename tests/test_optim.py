"""optim.py: AdamW with bf16 moments against optax's, the schedule, the weight-decay mask."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from model import ModelConfig, Transformer
from optim import learning_rate_schedule, make_optimizer, scale_by_adam
from train import TrainConfig

TINY = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=2, d_ff=128, max_seq_len=32,
                   dtype="float32")


def test_weight_decay_skips_norms_and_the_input_embedding():
    config = TrainConfig(steps=10, batch_size=1, warmup_steps=1, weight_decay=0.5, learning_rate=0.1)
    optimizer = make_optimizer(config)
    model = Transformer(TINY, jax.random.key(0))
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


def _quadratic_problem():
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(64,)), jnp.float32)
    loss = lambda w: jnp.mean((a @ w["x"] - b) ** 2) + jnp.sum(w["y"] ** 2)
    return loss, {"x": jnp.zeros(32), "y": jnp.ones(8)}


def _descend(optimizer, steps=60):
    loss, params = _quadratic_problem()
    state = optimizer.init(params)
    trajectory = []
    for _ in range(steps):
        value, grads = jax.value_and_grad(loss)(params)
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        trajectory.append(float(value))
    return params, np.array(trajectory), state


def test_adamw_with_fp32_moments_is_optax_adamw():
    ours = optax.chain(scale_by_adam(0.9, 0.95, 1e-8, "float32"), optax.add_decayed_weights(0.1),
                       optax.scale_by_learning_rate(1e-2))
    reference = optax.adamw(1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
    p1, t1, _ = _descend(ours)
    p2, t2, _ = _descend(reference)
    np.testing.assert_allclose(t1, t2, rtol=1e-6)
    for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_adamw_with_bf16_moments_stores_bf16_and_tracks_optax_fp32_adamw():
    ours = optax.chain(scale_by_adam(0.9, 0.95, 1e-8, "bfloat16"), optax.add_decayed_weights(0.1),
                       optax.scale_by_learning_rate(1e-2))
    p1, t1, state = _descend(ours)
    p2, t2, _ = _descend(optax.adamw(1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1))
    moments = jax.tree.leaves((state[0].mu, state[0].nu))
    assert moments and all(m.dtype == jnp.bfloat16 for m in moments)
    assert t1[-1] < 0.5 * t1[0]  # it optimizes
    # bf16 keeps 8 bits of mantissa: the moments are off by up to ~0.4%, the path by about as much.
    np.testing.assert_allclose(t1, t2, rtol=2e-2)
    for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(x, y, rtol=5e-2, atol=5e-3)
