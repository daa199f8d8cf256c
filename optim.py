"""The optimizer of every julian run: AdamW with bf16 moments, warmup + cosine, no decay on gains.

`TrainConfig` (what decides a run's numbers) lives here, beside what reads it: the optimizer, the
schedule and budget.py's dry run read it without importing the training loop. `make_optimizer`
reads its fields learning_rate, min_lr_ratio, warmup_steps, steps, beta1, beta2, adam_eps,
grad_clip, weight_decay, opt_state_dtype. A fork
that tries another optimizer changes this file only.

A moment whose beta is too close to 1 for bf16 (`moment_dtypes`) is stored in fp32 whatever
--opt_state_dtype says. bf16 keeps 8 significant bits: a stored moment moves in steps of 2^-8 to
2^-7 of itself, and an update `beta * v + (1 - beta) * g^2` that moves `v` by less than half a
step rounds back to `v`. So a moment stops decaying toward its target once within 2^-8 / (1 - beta)
of it (relative): never decays at all once 1 - beta < 2^-9 (beta2 = 0.999: after a gradient of 1.0
for 200 steps and 0.1 for 2,800, bf16's nu is 0.195 where fp32's is 0.020), and stays 15% high at
beta2 = 0.98, 60% at 0.99. Keeping such a moment in fp32 rather than refusing the flags: the run
the user asked for is then right, at 2 bytes per parameter more, which --dry_run's memory shows;
a refusal would only make them type --opt_state_dtype=float32.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int

from model import Transformer

@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What decides the numbers: optimization and data order."""
    steps: int
    batch_size: int
    grad_accum: int = 1
    learning_rate: float = 1.2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 3000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    opt_state_dtype: str = "bfloat16"
    seed: int = 0

    def __post_init__(self):
        for name, value, ok, expected in (
                ("steps", self.steps, self.steps >= 1, ">= 1"),
                ("batch_size", self.batch_size, self.batch_size >= 1, ">= 1"),
                ("grad_accum", self.grad_accum, self.grad_accum >= 1, ">= 1"),
                ("learning_rate", self.learning_rate, self.learning_rate > 0, "> 0"),
                ("min_lr_ratio", self.min_lr_ratio, 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
                ("weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0"),
                ("beta1", self.beta1, 0 <= self.beta1 < 1, "in [0, 1)"),
                ("beta2", self.beta2, 0 <= self.beta2 < 1, "in [0, 1)"),
                ("grad_clip", self.grad_clip, self.grad_clip > 0, "> 0")):
            if not ok:
                raise ValueError(f"--{name}={value:g} must be {expected}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"--batch_size={self.batch_size} is not divisible by "
                             f"--grad_accum={self.grad_accum}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"--warmup_steps={self.warmup_steps} must be in [0, --steps={self.steps})")


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
    return eqx.tree_at(weights, mask, replace_fn=lambda _: True)


# bf16 moments stall within 2^-8 / (1 - beta) of their target (see above): under this 1 - beta
# (beta > 0.961) that is more than 10% off, and the moment is stored in fp32. The report's
# beta1 = 0.9 and beta2 = 0.95 (at most 7.8% off, 5.6% in the scenario above) stay in bf16.
BF16_STALL_TOLERANCE = 0.1
BF16_MIN_DECAY = 2.0 ** -8 / BF16_STALL_TOLERANCE


def moment_dtypes(config: TrainConfig) -> tuple[str, str]:
    """Storage dtypes of (mu, nu): --opt_state_dtype, except fp32 for a moment whose beta bf16
    cannot decay by (1 - beta < BF16_MIN_DECAY)."""
    pick = lambda beta: "float32" if config.opt_state_dtype == "bfloat16" and 1 - beta < BF16_MIN_DECAY \
        else config.opt_state_dtype
    return pick(config.beta1), pick(config.beta2)


def learning_rate_applied(config: TrainConfig, opt_state: optax.OptState) -> Float[Array, ""]:
    """The learning rate the next `update` of make_optimizer(config) applies: the schedule at the
    count of its own state (found by name, not by place in the chain), which a skipped
    (non-finite) step does not advance."""
    return learning_rate_schedule(config)(optax.tree_utils.tree_get(opt_state, "ScaleByScheduleState").count)


class AdamState(NamedTuple):
    count: Int[Array, ""]
    mu: optax.Updates
    nu: optax.Updates


def scale_by_adam(b1: float, b2: float, eps: float, mu_dtype: str, nu_dtype: str) -> optax.GradientTransformation:
    """Adam's direction with the moments *stored* in `mu_dtype` and `nu_dtype`, computed in fp32.

    optax.scale_by_adam's `mu_dtype` covers the first moment only; the report kept both in bf16,
    which halves the optimizer state (a third of the 600m model's checkpoint and memory).
    """
    def init(params):
        zeros = lambda dtype: lambda p: jnp.zeros(p.shape, dtype)
        return AdamState(jnp.zeros((), jnp.int32), jax.tree.map(zeros(mu_dtype), params),
                         jax.tree.map(zeros(nu_dtype), params))

    def update(grads, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        mu = jax.tree.map(lambda g, m: (1 - b1) * g + b1 * m.astype(jnp.float32), grads, state.mu)
        nu = jax.tree.map(lambda g, v: (1 - b2) * g * g + b2 * v.astype(jnp.float32), grads, state.nu)
        correction1 = 1 - b1 ** count.astype(jnp.float32)
        correction2 = 1 - b2 ** count.astype(jnp.float32)
        direction = jax.tree.map(lambda m, v: (m / correction1) / (jnp.sqrt(v / correction2) + eps), mu, nu)
        cast = lambda tree, dtype: jax.tree.map(lambda x: x.astype(dtype), tree)
        return direction, AdamState(count, cast(mu, mu_dtype), cast(nu, nu_dtype))

    return optax.GradientTransformation(init, update)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        scale_by_adam(config.beta1, config.beta2, config.adam_eps, *moment_dtypes(config)),
        optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
        optax.scale_by_learning_rate(learning_rate_schedule(config)),
    )
