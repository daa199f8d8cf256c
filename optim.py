"""The optimizer of every julian run: AdamW with bf16 moments, warmup + cosine, no decay on gains.

`make_optimizer(config)` reads these fields of a train.TrainConfig: learning_rate, min_lr_ratio,
warmup_steps, steps, beta1, beta2, adam_eps, grad_clip, weight_decay, opt_state_dtype. A fork
that tries another optimizer changes this file only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Int

from model import Transformer

if TYPE_CHECKING:
    from train import TrainConfig


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    # 1) linear warmup from 0 avoids early Adam steps on noisy moment estimates;
    # 2) cosine decay to min_lr_ratio of the peak, as the report does (1.2e-3 -> 1.2e-4).
    return optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, config.warmup_steps, config.steps,
        end_value=config.learning_rate * config.min_lr_ratio)


def decay_mask(model: Transformer) -> Transformer:
    """True for the matmul weights. Norm gains and the input embedding are not decayed: a gain
    decayed toward 0 fights the normalization, and embedding rows of rare tokens would shrink
    merely for being rarely seen. The untied output projection is a matmul and is decayed."""
    mask = jax.tree.map(lambda _: False, model)
    weights = lambda m: (m.blocks.attn.wq, m.blocks.attn.wk, m.blocks.attn.wv, m.blocks.attn.wo,
                         m.blocks.mlp.w_gate, m.blocks.mlp.w_up, m.blocks.mlp.w_down,
                         *(() if m.lm_head is None else (m.lm_head,)))  # tied: the embedding's, undecayed
    return eqx.tree_at(weights, mask, replace=(True,) * (7 if model.lm_head is None else 8))


class AdamState(NamedTuple):
    count: Int[Array, ""]
    mu: optax.Updates
    nu: optax.Updates


def scale_by_adam(b1: float, b2: float, eps: float, moment_dtype: str) -> optax.GradientTransformation:
    """Adam's direction with both moments *stored* in `moment_dtype`, computed in fp32.

    optax.scale_by_adam's `mu_dtype` covers the first moment only; the report kept both in bf16,
    which halves the optimizer state (a third of the 600m model's checkpoint and memory).
    """
    def init(params):
        zeros = lambda p: jnp.zeros(p.shape, moment_dtype)
        return AdamState(jnp.zeros((), jnp.int32), jax.tree.map(zeros, params), jax.tree.map(zeros, params))

    def update(grads, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        mu = jax.tree.map(lambda g, m: (1 - b1) * g + b1 * m.astype(jnp.float32), grads, state.mu)
        nu = jax.tree.map(lambda g, v: (1 - b2) * g * g + b2 * v.astype(jnp.float32), grads, state.nu)
        correction1 = 1 - b1 ** count.astype(jnp.float32)
        correction2 = 1 - b2 ** count.astype(jnp.float32)
        direction = jax.tree.map(lambda m, v: (m / correction1) / (jnp.sqrt(v / correction2) + eps), mu, nu)
        cast = lambda tree: jax.tree.map(lambda x: x.astype(moment_dtype), tree)
        return direction, AdamState(count, cast(mu), cast(nu))

    return optax.GradientTransformation(init, update)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        scale_by_adam(config.beta1, config.beta2, config.adam_eps, config.opt_state_dtype),
        optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
        optax.scale_by_learning_rate(learning_rate_schedule(config)),
    )
