"""The jitted programs of training: the state they update, the train step, the held-out pass,
and their compile from abstract arguments (the dry run's).

`make_train_step` is one optimizer update: `lax.scan` over micro-batches (gradient accumulation),
the optimizer of optim.py, and a health check that skips the update when the loss or gradient
norm is not finite. It takes any loss function (`LossFn`): `token_loss` for pretraining and
SFT, dpo.py's for preference pairs. train.py's `fit` runs these programs; `compile_step` and
`dry_run` compile them for a pod this host may not have (budget.py's --hardware).
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

import budget
from model import ModelConfig, Transformer, cross_entropy
from optim import TrainConfig, learning_rate_applied, make_optimizer
from parallel import AXES, batch_sharding, global_batch, leaf_sharding, shardings


class TrainState(eqx.Module):
    model: Transformer
    opt_state: optax.OptState


def abstract_state(model_config: ModelConfig, optimizer: optax.GradientTransformation,
                   mesh: Mesh) -> TrainState:
    """The state's shapes, dtypes and shardings, without allocating it."""
    shapes = eqx.filter_eval_shape(lambda k: init_state(model_config, optimizer, k), jax.random.key(0))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=leaf_sharding(mesh, x.shape)),
                        shapes)


def init_state(model_config: ModelConfig, optimizer: optax.GradientTransformation,
               key: PRNGKeyArray) -> TrainState:
    model = Transformer(model_config, key)
    return TrainState(model, optimizer.init(model))


def as_batch(rows: np.ndarray | dict) -> dict[str, np.ndarray]:
    """Pretraining streams yield token rows; SFT yields {"tokens", "segment_ids", "weights"}."""
    return rows if isinstance(rows, dict) else {"tokens": rows}


# A loss function: (model, micro-batch, dropout key or None, mesh) -> (summed loss, count, summed
# metrics). The step's loss and each metric are their sums over micro-batches divided by the
# summed count (tokens for language modelling, pairs for dpo.py); gradients likewise. `mesh` is
# the mesh the step is built for (None: one device), which attention's kernels run under.
LossFn = Callable[[Transformer, dict, PRNGKeyArray | None, Mesh | None], tuple[Array, Array, dict[str, Array]]]


def token_loss(model: Transformer, micro: dict[str, Array], key: PRNGKeyArray | None, mesh: Mesh | None = None
               ) -> tuple[Float[Array, ""], Float[Array, ""], dict[str, Array]]:
    """Next-token cross-entropy summed over the weighted targets, and their count."""
    tokens = micro["tokens"]
    weights = micro.get("weights", jnp.ones(tokens[:, 1:].shape, jnp.float32))
    count = weights.sum()
    loss = cross_entropy(model, tokens, weights, micro.get("segment_ids"), mesh=mesh,
                         key=key if model.config.dropout else None)
    return loss * count, count, {}


class BoundProgram:
    """A jitted program with its last arguments bound: a loss function's own arrays (dpo.py's
    online reference model). Passed at every call, they stay arguments of the compiled program;
    closed over, jit would bake them into it as constants (the whole reference model in every
    compile and cache entry: 25.8 MiB for the tiny model's DPO step instead of 0.3 MiB)."""

    def __init__(self, jitted: Callable, *bound):
        self.jitted, self.bound = jitted, bound

    def __call__(self, *args):
        return self.jitted(*args, *self.bound)

    def lower(self, *args):
        return self.jitted.lower(*args, *self.bound)


def split_loss(loss_fn: LossFn) -> tuple[object, Callable[[object], LossFn]]:
    """(arrays, rebuild): the arrays a loss function holds (none for token_loss; an equinox
    module's fields), abstract ones included, and the function that puts them back."""
    arrays, rest = eqx.partition(loss_fn, lambda x: isinstance(x, (jax.Array, jax.ShapeDtypeStruct)))
    return arrays, lambda given: eqx.combine(given, rest)


def make_train_step(optimizer: optax.GradientTransformation, state_sharding, mesh: Mesh,
                    loss_fn: LossFn = token_loss, config: TrainConfig | None = None) -> BoundProgram:
    """The jitted update: (state, batch, step, inject_nan, stop_votes) -> (state, metrics).

    `batch` holds [grad_accum, micro, ...] arrays. `stop_votes` holds one bool per device (each
    process sets its own): their OR comes back as metrics["stop"], so every process learns of a
    signal any of them received at the same step, without a separate collective. Given the
    `config` that built `optimizer`, metrics["lr"] is the learning rate the update applied.
    """
    loss_arrays, with_arrays = split_loss(loss_fn)

    def train_step(state: TrainState, batch: dict[str, Array], key: PRNGKeyArray, step: Int[Array, ""],
                   inject_nan: Bool[Array, ""], stop_votes: Bool[Array, " devices"], loss_arrays):
        loss_fn = with_arrays(loss_arrays)
        weights = batch.get("weights")
        keys = jax.random.split(jax.random.fold_in(key, step), batch["tokens"].shape[0])

        # With sharded parameters, gather them for the compute: left to itself, XLA keeps the
        # matmuls' weights sharded and moves the activations instead (measured: 252 GiB of
        # temporaries per device for 600m on 32 devices). The blocks gather their own, in bf16, one
        # layer at a time inside the layer scan (model._sharded_layer); the embeddings, the final
        # norm and the output layer once here. Gradients go back sharded to `carry`.
        gathered = lambda m: (m.embed, m.final_norm.weight, *([] if m.lm_head is None else [m.lm_head]))
        model = eqx.tree_at(gathered, state.model, jax.lax.with_sharding_constraint(
            gathered(state.model), NamedSharding(mesh, P())))

        def micro_loss(m, micro, micro_key):
            loss, count, sums = loss_fn(m, micro, micro_key, mesh)
            return loss, (count, sums)

        def accumulate(carry, xs):
            (loss, aux), grads = jax.value_and_grad(micro_loss, has_aux=True)(model, *xs)
            return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

        first = jax.tree.map(lambda x: x[0], (batch, keys))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(micro_loss, model, *first))
        (loss, (count, sums), grads), _ = jax.lax.scan(
            accumulate, (*zeros, jax.tree.map(jnp.zeros_like, state.model)), (batch, keys))
        # Sums over the step, then one division: the mean over every token (or pair) of the step.
        count = jnp.maximum(count, 1.0)
        loss = jnp.where(inject_nan, jnp.nan, loss / count)
        grads = jax.tree.map(lambda g: g / count, grads)
        grad_norm = optax.global_norm(grads)
        applied = state.opt_state
        updates, opt_state = optimizer.update(grads, state.opt_state, state.model)
        updated = TrainState(optax.apply_updates(state.model, updates), opt_state)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), updated, state)
        metrics = {"loss": loss, "grad_norm": grad_norm, "skipped": ~ok,
                   "supervised_tokens": weights.sum() if weights is not None else count,
                   "stop": jnp.any(stop_votes), **{k: v / count for k, v in sums.items()}}
        if config is not None:  # the schedule at the optimizer's count: skipped steps do not advance it
            metrics["lr"] = learning_rate_applied(config, applied)
        return state, metrics

    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(train_step, donate_argnums=0,
                     in_shardings=(state_sharding, batch_sharding(mesh), replicated, replicated,
                                   replicated, NamedSharding(mesh, P(AXES)), shardings(loss_arrays)),
                     out_shardings=(state_sharding, replicated))
    return BoundProgram(jitted, loss_arrays)


# Something train.fit reports every --eval_every steps: the model (sharded over the run's mesh) ->
# named figures. The scripts' main() builds them (held-out loss, benchmark scores); the loop knows none.
Evaluator = Callable[[Transformer], dict[str, float]]


def held_out_step(mesh: Mesh, loss_fn: LossFn = token_loss) -> BoundProgram:
    """The jitted held-out pass: (model, [grad_accum, micro, ...] batch) -> (summed loss, count,
    summed metrics), one micro-batch at a time as the train step, so it needs no more memory
    than the step (the whole batch at once needed 4.7x the step's temporaries at grad_accum 8)."""
    loss_arrays, with_arrays = split_loss(loss_fn)

    def held_out(model: Transformer, batch: dict[str, Array], loss_arrays):
        loss_fn = with_arrays(loss_arrays)
        first = jax.tree.map(lambda x: x[0], batch)
        shapes = jax.eval_shape(lambda m, b: loss_fn(m, b, None, mesh), model, first)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        add = lambda total, micro: (jax.tree.map(jnp.add, total, loss_fn(model, micro, None, mesh)), None)
        return jax.lax.scan(add, zeros, batch)[0]

    return BoundProgram(jax.jit(held_out), loss_arrays)


def held_out_loss(validation_data, batches: int, mesh: Mesh, loss_fn: LossFn = token_loss) -> Evaluator:
    """eval_loss, and the loss function's metrics as eval_<name>, over global batches
    0..batches-1 of `validation_data` (read like train.fit's train_data, in its micro-batches)."""
    step = held_out_step(mesh, loss_fn)

    def evaluate(model: Transformer) -> dict[str, float]:
        loss = count = 0.0
        sums: dict[str, float] = {}
        for i in range(batches):
            batch = global_batch(as_batch(validation_data.batch(i)), validation_data.grad_accum, mesh)
            out = jax.device_get(step(model, batch))
            loss, count = loss + float(out[0]), count + float(out[1])
            sums = {k: sums.get(k, 0.0) + float(v) for k, v in out[2].items()}
        count = max(count, 1.0)
        return {"eval_loss": loss / count, **{f"eval_{k}": v / count for k, v in sums.items()}}

    return evaluate


def abstract_batch(model_config: ModelConfig, config: TrainConfig, mesh: Mesh,
                   row: dict[str, jax.ShapeDtypeStruct] | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """A step's [grad_accum, micro, ...] batch, abstract and placed on `mesh`. `row` is one batch
    row's arrays, a pretraining row of tokens by default (sft.py and dpo.py pass theirs)."""
    micro = config.batch_size // config.grad_accum
    row = row or {"tokens": jax.ShapeDtypeStruct((model_config.max_seq_len + 1,), jnp.int32)}
    return {name: jax.ShapeDtypeStruct((config.grad_accum, micro, *x.shape), x.dtype, sharding=batch_sharding(mesh))
            for name, x in row.items()}


def compile_step(model_config: ModelConfig, config: TrainConfig, mesh: Mesh, loss_fn: LossFn = token_loss,
                 row: dict[str, jax.ShapeDtypeStruct] | None = None):
    """The train step compiled for `mesh` (whose devices may be a topology's: budget.py's
    --hardware) from abstract arguments; allocates nothing. `row` as abstract_batch's (sft.py
    and dpo.py pass theirs, with their `loss_fn`, whose arrays may be abstract too)."""
    optimizer = make_optimizer(config)
    arguments = step_arguments(model_config, config, mesh, row)
    return make_train_step(optimizer, shardings(arguments[0]), mesh, loss_fn, config).lower(*arguments).compile()


def step_arguments(model_config: ModelConfig, config: TrainConfig, mesh: Mesh,
                   row: dict[str, jax.ShapeDtypeStruct] | None = None) -> tuple:
    """The train step's arguments (state, batch, key, step, inject_nan, stop_votes), abstract and
    placed on `mesh`: it may be a topology this host does not have."""
    replicated = NamedSharding(mesh, P())
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=replicated)
    votes = jax.ShapeDtypeStruct((mesh.size,), jnp.bool_, sharding=NamedSharding(mesh, P(AXES)))
    return (abstract_state(model_config, make_optimizer(config), mesh), abstract_batch(model_config, config, mesh, row),
            key, scalar(jnp.int32), scalar(jnp.bool_), votes)


def compile_held_out(model_config: ModelConfig, config: TrainConfig, mesh: Mesh, loss_fn: LossFn = token_loss,
                     row: dict[str, jax.ShapeDtypeStruct] | None = None):
    """The held-out pass (held_out_step) compiled for `mesh` on compile_step's batch."""
    model = abstract_state(model_config, make_optimizer(config), mesh).model
    return held_out_step(mesh, loss_fn).lower(model, abstract_batch(model_config, config, mesh, row)).compile()


def dry_run(model_config: ModelConfig, config: TrainConfig, fsdp: int, hardware: str, assumed_mfu: float,
            peak_tflops: float, compile_fn: budget.CompileFn = compile_step, **more) -> None:
    """budget.dry_run of a train step (this file's, or sft.py's and dpo.py's through `compile_fn`,
    with their `workload` and the programs they run `before` the steps): sizes, memory, kernels,
    fit on `hardware`, time budget."""
    budget.dry_run(model_config, config, fsdp, hardware, assumed_mfu, peak_tflops, compile_fn, **more)

