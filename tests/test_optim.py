"""optim.py: AdamW with bf16 moments against optax's, the schedule, the weight-decay mask."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from model import ModelConfig, Transformer
import optim
from optim import TrainConfig, learning_rate_schedule, make_optimizer, scale_by_adam

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
    ours = optax.chain(scale_by_adam(0.9, 0.95, 1e-8, "float32", "float32"), optax.add_decayed_weights(0.1),
                       optax.scale_by_learning_rate(1e-2))
    reference = optax.adamw(1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
    p1, t1, _ = _descend(ours)
    p2, t2, _ = _descend(reference)
    np.testing.assert_allclose(t1, t2, rtol=1e-6)
    for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_adamw_with_bf16_moments_stores_bf16_and_tracks_optax_fp32_adamw():
    ours = optax.chain(scale_by_adam(0.9, 0.95, 1e-8, "bfloat16", "bfloat16"), optax.add_decayed_weights(0.1),
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


def _second_moment_after_a_drop(config: TrainConfig) -> float:
    """nu after the issue's scenario: gradient 1.0 for 200 steps, then 0.1 for 2,800, through
    make_optimizer(config)'s Adam, its moments stored as moment_dtypes says."""
    optimizer = scale_by_adam(config.beta1, config.beta2, config.adam_eps, *optim.moment_dtypes(config))
    params = {"w": jnp.zeros(())}
    grads = jnp.concatenate([jnp.ones(200), jnp.full(2800, 0.1)])

    def step(state, g):
        _, state = optimizer.update({"w": g}, state, params)
        return state, None

    state, _ = jax.lax.scan(step, optimizer.init(params), grads)
    return float(state.nu["w"])


def test_bf16_second_moment_with_beta2_near_one_decays_as_fp32s():
    base = TrainConfig(steps=3000, batch_size=1, warmup_steps=0, beta2=0.999)
    fp32 = _second_moment_after_a_drop(dataclasses.replace(base, opt_state_dtype="float32"))
    bf16 = _second_moment_after_a_drop(base)
    np.testing.assert_allclose(fp32, 0.0196, rtol=0.05)  # 0.999^2800 of the 0.18 reached, plus 0.01
    np.testing.assert_allclose(bf16, fp32, rtol=0.1)
    # The report's beta2 = 0.95 decays in bf16 (and stays there: half the state's memory).
    report = dataclasses.replace(base, beta2=0.95)
    assert optim.moment_dtypes(report) == ("bfloat16", "bfloat16")
    np.testing.assert_allclose(_second_moment_after_a_drop(report),
                               _second_moment_after_a_drop(dataclasses.replace(report, opt_state_dtype="float32")),
                               rtol=0.1)
    assert optim.moment_dtypes(base) == ("bfloat16", "float32")

