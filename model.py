"""The Julian model: a LLaMA-style decoder in Equinox.

RoPE (rotate-halves layout, as Hugging Face Llama; optionally Llama 3's frequency scaling), SwiGLU
MLP, pre-norm RMSNorm, no biases, grouped-query attention (`n_kv_heads` K/V heads, each shared by
`n_heads // n_kv_heads` query heads; the default is one per query head), input and output
embeddings untied unless `tie_embeddings`. Blocks are stacked along a leading layer axis
(`eqx.filter_vmap` at init) and run with `lax.scan` or an unrolled loop. `Transformer.forward`
is the one forward pass: training (packed rows, segment ids), evaluation's packed scoring (an
explicit mask and positions) and decoding (new tokens against a `KVCache` of fixed size: prefill,
then one token per step, every shape static). `target_logps` is the one way tokens are scored
(the loss, DPO's log-probabilities, evaluation), a chunk of positions at a time.

Precision: parameters are fp32; activations and matmul inputs use `config.dtype` (bf16 by
default) with fp32 accumulation; norms, softmax, logits and the loss are fp32. The matmuls
(`einsum`), SwiGLU and attention (`attend`, with its kernel per platform) are layer_ops.py's:
the numerics and kernel choices every layer shares.

This file imports nothing of ours but layer_ops.py: no I/O, no flags.
"""

from __future__ import annotations

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from layer_ops import (ATTENTION_IMPLS, CONTEXT, MLP_HIDDEN, MLP_OUT, OUT_PROJ, QKV, Segments, attend, einsum,
                       swiglu)

# --remat: the named matmul outputs each policy keeps from the forward for the backward (in the
# compute dtype); the rest of a block is recomputed. From least to most recomputation:
#   none: nothing recomputed; dots: every matmul output but the attention scores; dots_except_mlp:
#   all but the MLP's d_ff-wide gate and up (the largest, 2 x d_ff per token); attention: the q/k/v
#   and output projections only; full: only each block's input.
REMAT_SAVES = {"dots": (QKV, CONTEXT, OUT_PROJ, MLP_HIDDEN, MLP_OUT), "dots_except_mlp": (QKV, CONTEXT, OUT_PROJ, MLP_OUT),
               "attention": (QKV, OUT_PROJ), "full": ()}
REMAT_POLICIES = ("none", *REMAT_SAVES)
# Positions per piece of the vocabulary-sized head in `target_logps`: a piece's fp32 logits are
# batch x SCORE_CHUNK x vocab (4 x 512 x 50,000 x 4 bytes = 410 MB at the 600m's batch per chip).
SCORE_CHUNK = 512


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 50_000
    d_model: int = 1280
    n_layers: int = 18
    n_heads: int = 20
    d_ff: int = 5120
    max_seq_len: int = 2048
    rope_theta: float = 10_000.0
    # Llama 3's rotary frequency scaling: (factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings), or None for plain RoPE.
    rope_scaling: tuple[float, float, float, int] | None = None
    n_kv_heads: int | None = None  # K/V heads for grouped-query attention; None: n_heads (MHA)
    tie_embeddings: bool = False  # the output projection is the input embedding, transposed
    norm_eps: float = 1e-6
    dropout: float = 0.0
    dtype: str = "bfloat16"  # activations and matmul inputs; "float32" for exact checks
    scan_layers: bool = True  # one compiled block for all layers; unrolled runs faster on CPU
    remat: str = "none"  # one of REMAT_POLICIES: which matmul outputs the backward keeps (REMAT_SAVES)
    attention: str = "auto"  # one of ATTENTION_IMPLS; "auto" (as --attention) picks by target platform at trace time
    # The residual stream in fp32 (blocks add their `dtype` outputs to it) instead of `dtype`:
    # evaluation's choice, where it halves bf16's log-likelihood error for free (see tests).
    fp32_residual: bool = False

    def __post_init__(self):
        if self.rope_scaling is not None:  # a JSON list from a checkpoint's config; hashable here
            object.__setattr__(self, "rope_scaling", tuple(self.rope_scaling))
        problems = []
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if self.n_heads > 0 and self.d_model % self.n_heads:
            problems.append(
                f"n_heads={self.n_heads} does not divide d_model={self.d_model}: "
                "expected d_model to be a multiple of n_heads")
        elif self.n_heads > 0 and (self.d_model // self.n_heads) % 2:
            problems.append(f"head_dim={self.d_model // self.n_heads} must be even for rotary embeddings")
        if self.n_kv_heads is not None and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
            problems.append(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.rope_scaling is not None and (
                len(self.rope_scaling) != 4 or self.rope_scaling[0] < 1
                or not 0 < self.rope_scaling[1] < self.rope_scaling[2] or self.rope_scaling[3] <= 0):
            problems.append(f"rope_scaling={self.rope_scaling} must be (factor >= 1, low_freq_factor, "
                            "high_freq_factor > low_freq_factor > 0, original_max_position_embeddings > 0)")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout={self.dropout} must be in [0, 1)")
        if self.remat not in REMAT_POLICIES:
            problems.append(f"remat={self.remat!r} must be one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION_IMPLS:
            problems.append(f"attention={self.attention!r} must be one of {ATTENTION_IMPLS}")
        if self.dtype not in ("bfloat16", "float32", "float16"):
            problems.append(f"dtype={self.dtype!r} must be bfloat16, float16 or float32")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads


def num_params(config: ModelConfig) -> int:
    """Exact parameter count, from the shapes alone (nothing is allocated)."""
    shapes = eqx.filter_eval_shape(Transformer, config, jax.random.key(0))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (matmul parameters) + 12·L·T·d_model (PaLM appendix B).

    6 x the parameters that take part in matmuls counts their forward (2) and backward (4)
    multiply-adds: every weight but an untied input embedding, whose "matmul" is a row gather (PaLM
    counts it because PaLM ties it to the output projection: a tied table is counted once, as that
    projection); grouped-query attention's smaller K/V projections are in the count. 12·L·T·d is
    the attention scores and weighted sum (QK^T and AV, forward and backward) at full, unmasked
    length T, over all query heads (n_heads · head_dim = d_model) however few K/V heads they share,
    as the kernels compute them. The norm gains' elementwise products are left in (under 0.1%).
    tests/test_model.py checks this within 5% of XLA's own count of the compiled step.
    """
    gather = 0 if config.tie_embeddings else config.vocab_size * config.d_model
    return 6.0 * (num_params(config) - gather) + 12.0 * config.n_layers * seq_len * config.d_model


# --------------------------------------------------------------------------------------------
# Layers.


def _normal(key: PRNGKeyArray, shape: tuple[int, ...], std: float) -> Float[Array, "..."]:
    return std * jax.random.normal(key, shape, jnp.float32)


class RMSNorm(eqx.Module):
    weight: Float[Array, " d_model"]
    eps: float = eqx.field(static=True)

    def __init__(self, d_model: int, eps: float):
        self.weight = jnp.ones((d_model,), jnp.float32)
        self.eps = eps

    def __call__(self, x: Float[Array, "*batch d_model"], dtype: str) -> Float[Array, "*batch d_model"]:
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (self.weight * x).astype(dtype)


def _segment_starts(segment_ids: Int[Array, "batch seq"]) -> Bool[Array, "batch seq"]:
    first = jnp.ones_like(segment_ids[:, :1], bool)
    return jnp.concatenate([first, segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def segment_positions(segment_ids: Int[Array, "batch seq"]) -> Int[Array, "batch seq"]:
    """Position of each token within its segment: positions restart where the segment id changes."""
    t = jnp.arange(segment_ids.shape[1])
    return t - jax.lax.cummax(jnp.where(_segment_starts(segment_ids), t, 0), axis=1)


def rotary_frequencies(head_dim: int, theta: float,
                       scaling: tuple[float, float, float, int] | None = None) -> Float[Array, " half"]:
    """RoPE's angular frequency per pair of channels; with `scaling`, Llama 3's: low frequencies
    (wavelengths beyond the original context / low_freq_factor) slowed down by `factor`, high ones
    (below original context / high_freq_factor) kept, and the band between interpolated
    (transformers' `_compute_llama3_parameters`)."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, half, dtype=jnp.float32) / half))
    if scaling is None:
        return inv_freq
    factor, low, high, original = scaling
    wavelength = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelength > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= original / high) & (wavelength <= original / low)
    return jnp.where(medium, smoothed, scaled)


def rotary(x: Float[Array, "batch heads seq head_dim"], positions: Int[Array, "batch seq"],
           theta: float, scaling: tuple[float, float, float, int] | None = None
           ) -> Float[Array, "batch heads seq head_dim"]:
    """Rotate the two halves of each head by position-dependent angles (Hugging Face's layout)."""
    inv_freq = rotary_frequencies(x.shape[-1], theta, scaling)
    angles = positions.astype(jnp.float32)[:, None, :, None] * inv_freq  # batch 1 seq half
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# One layer's keys and values for every cache slot: (k, v), each [batch, heads, size, head_dim].
LayerCache = tuple[Float[Array, "batch kv_heads size head_dim"], Float[Array, "batch kv_heads size head_dim"]]


class Attention(eqx.Module):
    wq: Float[Array, "d_model d_attn"]
    wk: Float[Array, "d_model d_kv"]
    wv: Float[Array, "d_model d_kv"]
    wo: Float[Array, "d_attn d_model"]
    n_heads: int = eqx.field(static=True)
    n_kv_heads: int = eqx.field(static=True)

    def __init__(self, config: ModelConfig, key: PRNGKeyArray):
        kq, kk, kv, ko = jax.random.split(key, 4)
        d, d_kv = config.d_model, config.kv_heads * config.head_dim
        self.wq = _normal(kq, (d, d), 0.02)
        self.wk, self.wv = (_normal(k, (d, d_kv), 0.02) for k in (kk, kv))
        # Scaled so the residual stream's variance does not grow with depth (GPT-2).
        self.wo = _normal(ko, (d, d), 0.02 / math.sqrt(2 * config.n_layers))
        self.n_heads = config.n_heads
        self.n_kv_heads = config.kv_heads

    def qkv(self, x: Float[Array, "batch seq d_model"], positions: Int[Array, "batch seq"],
            config: ModelConfig) -> tuple[Float[Array, "batch heads seq head_dim"],
                                          Float[Array, "batch kv_heads seq head_dim"],
                                          Float[Array, "batch kv_heads seq head_dim"]]:
        """Rotated queries and keys, and values, heads before time."""
        b, t, _ = x.shape
        # Heads before time, so every attention product batches over leading (batch, head) axes:
        # XLA:CPU rejects bf16 -> f32 batched dots whose batch axes are not leading.
        heads = lambda w, n: einsum("btd,de->bte", x, w, config.dtype, QKV).reshape(
            b, t, n, -1).transpose(0, 2, 1, 3)
        q = rotary(heads(self.wq, self.n_heads), positions, config.rope_theta, config.rope_scaling)
        k = rotary(heads(self.wk, self.n_kv_heads), positions, config.rope_theta, config.rope_scaling)
        return q, k, heads(self.wv, self.n_kv_heads)

    def __call__(self, x: Float[Array, "batch seq d_model"], segments: Segments,
                 positions: Int[Array, "batch seq"], config: ModelConfig, mesh: Mesh | None = None,
                 cache: LayerCache | None = None) -> tuple[Float[Array, "batch seq d_model"], LayerCache | None]:
        """The attention sublayer, and with a `cache` (decoding) that cache holding these tokens'
        keys and values at their positions, which they attend to with everything before them
        (`segments` is then the [batch, seq, size] mask of the slots each token sees)."""
        b, t, d = x.shape
        q, k, v = self.qkv(x, positions, config)
        if cache is not None:
            # One scatter index per (row, head, token): at batch 1 a per-row write is simplified
            # to a dynamic-update-slice, which XLA:CPU fused with the attention's read and so
            # copied every layer's cache at every step; this scatter updates the donated cache in place.
            rows, heads = jnp.arange(b)[:, None, None], jnp.arange(self.n_kv_heads)[None, :, None]
            k, v = (c.at[rows, heads, positions[:, None, :]].set(new.astype(c.dtype)) for c, new in zip(cache, (k, v)))
            cache = (k, v)
        out = attend(q, k, v, segments, config.attention, config.dtype, mesh)
        out = out.reshape(b, t, d).astype(config.dtype)
        return einsum("bte,ed->btd", out, self.wo, config.dtype, OUT_PROJ), cache



class MLP(eqx.Module):
    w_gate: Float[Array, "d_model d_ff"]
    w_up: Float[Array, "d_model d_ff"]
    w_down: Float[Array, "d_ff d_model"]

    def __init__(self, config: ModelConfig, key: PRNGKeyArray):
        kg, ku, kd = jax.random.split(key, 3)
        self.w_gate = _normal(kg, (config.d_model, config.d_ff), 0.02)
        self.w_up = _normal(ku, (config.d_model, config.d_ff), 0.02)
        self.w_down = _normal(kd, (config.d_ff, config.d_model), 0.02 / math.sqrt(2 * config.n_layers))

    def __call__(self, x: Float[Array, "batch seq d_model"], config: ModelConfig
                 ) -> Float[Array, "batch seq d_model"]:
        gate = einsum("btd,df->btf", x, self.w_gate, config.dtype, MLP_HIDDEN)
        up = einsum("btd,df->btf", x, self.w_up, config.dtype, MLP_HIDDEN)
        hidden = swiglu(gate, up)
        return einsum("btf,fd->btd", hidden, self.w_down, config.dtype, MLP_OUT)


class Block(eqx.Module):
    attn_norm: RMSNorm
    attn: Attention
    mlp_norm: RMSNorm
    mlp: MLP

    def __init__(self, config: ModelConfig, key: PRNGKeyArray):
        ka, km = jax.random.split(key)
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config, ka)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config, km)

    def __call__(self, x: Float[Array, "batch seq d_model"], segments: Segments,
                 positions: Int[Array, "batch seq"], config: ModelConfig, key: PRNGKeyArray | None,
                 mesh: Mesh | None = None, cache: LayerCache | None = None
                 ) -> tuple[Float[Array, "batch seq d_model"], LayerCache | None]:
        k_attn, k_mlp = jax.random.split(key) if key is not None else (None, None)
        h, cache = self.attn(self.attn_norm(x, config.dtype), segments, positions, config, mesh, cache)
        x = x + _dropout(h, config.dropout, k_attn)
        h = self.mlp(self.mlp_norm(x, config.dtype), config)
        return x + _dropout(h, config.dropout, k_mlp), cache


def _dropout(x: Float[Array, "..."], rate: float, key: PRNGKeyArray | None) -> Float[Array, "..."]:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _sharded_layer(layer_params: Block, x: Float[Array, "batch seq d_model"], dtype: str, mesh: Mesh | None
                   ) -> tuple[Block, Float[Array, "batch seq d_model"]]:
    """On a `mesh` whose "fsdp" axis shards the parameters (train.py's steps): this layer's
    matrices cast to `dtype` and gathered whole onto every device, one layer at a time inside the
    layer scan, and the activations kept split by batch over all devices. XLA then moves bf16
    weights, one layer's at a time (their gradients go back reduce-scattered), rather than
    activations; the whole model is never gathered at once."""
    if mesh is None or mesh.shape["fsdp"] == 1:
        return layer_params, x
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    gather = lambda a: jax.lax.with_sharding_constraint(a.astype(dtype) if a.ndim == 2 else a, replicated)
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names))
    return jax.tree.map(gather, layer_params), jax.lax.with_sharding_constraint(x, batch)


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.save_only_these_names(*REMAT_SAVES[policy]))


class Transformer(eqx.Module):
    embed: Float[Array, "vocab d_model"]
    blocks: Block  # every array has a leading n_layers axis
    final_norm: RMSNorm
    lm_head: Float[Array, "d_model vocab"] | None  # None when tied: the head is embed.T
    config: ModelConfig = eqx.field(static=True)

    def __init__(self, config: ModelConfig, key: PRNGKeyArray):
        ke, kb, kh = jax.random.split(key, 3)
        self.embed = _normal(ke, (config.vocab_size, config.d_model), 0.02)
        self.blocks = eqx.filter_vmap(lambda k: Block(config, k))(jax.random.split(kb, config.n_layers))
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else _normal(kh, (config.d_model, config.vocab_size), 0.02)
        self.config = config

    def forward(self, tokens: Int[Array, "batch seq"], segments: Segments | None = None, *, mesh: Mesh | None,
                positions: Int[Array, "batch seq"] | None = None, cache: KVCache | None = None,
                valid: Int[Array, " batch"] | None = None, layers: tuple[Block, ...] | None = None,
                key: PRNGKeyArray | None = None) -> tuple[Float[Array, "batch seq d_model"], KVCache | None]:
        """Final-norm hidden states of `tokens`: the one forward pass of training, scoring and
        decoding. `mesh` is the mesh the program is built for (None: one device); attention picks
        its kernel by that mesh's platform and runs it per device under it.

        What each token sees:
          * training: `segments` [batch, seq] ids (default: one segment per row) isolate packed
            documents; positions restart at each change of id.
          * packed scoring (evaluate.py's prefix trees): `segments` a [batch, seq, seq] boolean
            mask with explicit `positions` (segment ids cannot say "branches from a shared prefix").
          * decoding: `cache`; row r's tokens take positions `cache.lengths[r]` onwards and see
            every earlier slot. Only its first `valid[r]` (default: all) count as written, so a
            right-padded batch of prompts prefills in one call; the caller keeps `cache.lengths +
            new` within the cache's size (a write past it would be dropped). `layers` is
            `self.layers()`, made once outside the jitted steps (else each call copies the
            weights); the layers then run unrolled whatever `scan_layers` says: a scan would slice,
            and so copy, each layer's weights and cache at every step. Returns the updated cache.
        """
        config = self.config
        if cache is not None:
            positions = cache.lengths[:, None] + jnp.arange(tokens.shape[1])
            # Slots up to a token's own position hold the row's earlier tokens; later slots hold
            # padding or stale entries, and causality alone hides them.
            segments = jnp.arange(cache.k[0].shape[2])[None, None, :] <= positions[:, :, None]
        elif segments is None or segments.ndim == 2:
            # Positions count along the row here (explicit ones may be depths in a longer row).
            if tokens.shape[1] > config.max_seq_len:
                raise ValueError(f"{tokens.shape[1]} tokens exceed the model's max_seq_len={config.max_seq_len}")
            ids = jnp.zeros_like(tokens) if segments is None else segments
            positions = segment_positions(ids)
            # A segment is a run of equal ids: number the runs, so an id that comes back later
            # starts a new segment (attention masks on the raw index, since positions restart).
            segments = jnp.cumsum(_segment_starts(ids), axis=1)
        elif positions is None:
            raise ValueError("an explicit [batch, seq, seq] attention mask needs explicit positions")
        # Rows gathered from the fp32 table, then cast: the gradient's scatter-add then sums in
        # fp32 (a bf16 table's loses a frequent token's updates), and decoding casts a few rows,
        # not the whole table, per step.
        x = self.embed[tokens].astype(jnp.float32 if config.fp32_residual else config.dtype)

        if cache is not None:
            k, v = [], []
            for block, kv in zip(self.layers() if layers is None else layers, zip(cache.k, cache.v)):
                x, (k_cache, v_cache) = block(x, segments, positions, config, None, mesh, kv)
                k.append(k_cache)
                v.append(v_cache)
            lengths = cache.lengths + (tokens.shape[1] if valid is None else valid)
            return self.final_norm(x, config.dtype), KVCache(tuple(k), tuple(v), lengths)

        keys = jax.random.split(key, config.n_layers) if key is not None else None
        params, static = eqx.partition(self.blocks, eqx.is_array)

        def layer(x, layer_params, layer_key):
            layer_params, x = _sharded_layer(layer_params, x, config.dtype, mesh)
            block = eqx.combine(layer_params, static)
            return block(x, segments, positions, config, layer_key, mesh)[0]

        layer = _remat(layer, config.remat)
        if config.scan_layers:
            x, _ = jax.lax.scan(lambda x, pk: (layer(x, *pk), None), x, (params, keys))
        else:
            for i in range(config.n_layers):
                x = layer(x, jax.tree.map(lambda a: a[i], params), None if keys is None else keys[i])
        return self.final_norm(x, config.dtype), None

    def __call__(self, tokens: Int[Array, "batch seq"], segment_ids: Int[Array, "batch seq"] | None = None,
                 *, key: PRNGKeyArray | None = None, mesh: Mesh | None = None) -> Float[Array, "batch seq vocab"]:
        """fp32 next-token logits at every position (tests and conversion checks: training and
        scoring go through `target_logps`, which never holds them all)."""
        return self.head(self.forward(tokens, segment_ids, mesh=mesh, key=key)[0])

    def head(self, hidden: Float[Array, "batch seq d_model"]) -> Float[Array, "batch seq vocab"]:
        """fp32 logits of final hidden states (a sampler applies it to the last position only)."""
        if self.lm_head is None:
            return einsum("btd,vd->btv", hidden, self.embed, self.config.dtype)
        return einsum("btd,dv->btv", hidden, self.lm_head, self.config.dtype)

    def layers(self) -> tuple[Block, ...]:
        """Each layer's block on arrays of its own: a copy of the blocks' weights, made once for
        many decoding steps (`forward` with a cache). Inside a jitted step, XLA:CPU copies a slice of the stacked
        arrays (a `scan` step's, or an unrolled `blocks[i]`) before a matmul reads it: a batch-1
        step, which only has to read each weight once, read it, wrote a copy and read that.
        The matrices are copied in the activation dtype, which `einsum` casts them to anyway: the
        same numbers, and under bf16 a step reads half the bytes."""
        params, static = eqx.partition(self.blocks, eqx.is_array)
        # Stacked matrices have 3 axes; norm weights (2) stay fp32, as RMSNorm takes them.
        copy = lambda a, i: a[i].astype(self.config.dtype) if a.ndim == 3 else a[i]
        return tuple(eqx.combine(jax.tree.map(lambda a: copy(a, i), params), static)
                     for i in range(self.config.n_layers))


class KVCache(eqx.Module):
    """Keys and values at `size` positions per row, one array per layer (a layer's slice of a
    stacked array would be copied at every step); row r holds `lengths[r]` tokens."""
    k: tuple[Float[Array, "batch kv_heads size head_dim"], ...]
    v: tuple[Float[Array, "batch kv_heads size head_dim"], ...]
    lengths: Int[Array, " batch"]


def init_cache(config: ModelConfig, batch: int, size: int) -> KVCache:
    """An empty cache for `batch` rows of up to `size` tokens, in the activation dtype."""
    zeros = lambda: jnp.zeros((batch, config.kv_heads, size, config.head_dim), config.dtype)
    return KVCache(tuple(zeros() for _ in range(config.n_layers)), tuple(zeros() for _ in range(config.n_layers)),
                   jnp.zeros((batch,), jnp.int32))


def _row_sum(x: Float[Array, "*batch n"]) -> Float[Array, " *batch"]:
    """Sum over the last axis. On a CPU as a product with a vector of ones: XLA:CPU runs that as
    a matrix-vector product, about 3x faster than its row reduction over a vocabulary-wide row
    (SmolLM2-135M's 49,152 logits, benchmarks/README.md); elsewhere a reduction, which needs no
    fp32 matmul precision."""
    ones = lambda x: jnp.dot(x, jnp.ones(x.shape[-1], x.dtype), precision=jax.lax.Precision.HIGHEST)
    return jax.lax.platform_dependent(x, cpu=ones, default=lambda x: jnp.sum(x, axis=-1))


def target_logps(model: Transformer, hidden: Float[Array, "batch seq d_model"], targets: Int[Array, "batch seq"],
                 chunk: int = SCORE_CHUNK) -> tuple[Float[Array, "batch seq"], Bool[Array, "batch seq"]]:
    """The one way tokens are scored: log p(target) under the model's head at every position of
    `hidden` (fp32 log-softmax), and whether the target is the head's argmax. The loss, DPO's
    sequence log-probabilities, packed pairs and evaluation all reduce these.

    The [batch, seq, vocab] fp32 logits are never all held: the sequence is cut into pieces of at
    most `chunk` positions, scored one after another (lax.map), and each piece's logits are
    recomputed in the backward pass (jax.checkpoint) rather than kept; the batch axis stays whole,
    so a batch split over devices stays split. The target's logit is picked with a one-hot
    `where`, not `take_along_axis`, whose gradient scatters into a zeroed vocab-sized buffer (that
    measured slower on an AMX CPU).
    """
    def score(h: Float[Array, "batch piece d_model"], y: Int[Array, "batch piece"]):
        logits = model.head(h)
        vocab = jnp.arange(logits.shape[-1])
        picked = jnp.sum(jnp.where(y[..., None] == vocab, logits, 0.0), axis=-1)
        top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
        log_total = jnp.log(_row_sum(jnp.exp(logits - top[..., None])))
        # argmax's first-index rule without its (value, index) reduction, which XLA:CPU runs
        # several times slower than a max: the target is the argmax when its logit is the top
        # one and no earlier token reaches it.
        earlier = jnp.max(jnp.where(vocab < y[..., None], logits, -jnp.inf), axis=-1)
        return picked - top - log_total, (picked == top) & (earlier < top)

    b, t, _ = hidden.shape
    if t <= chunk:
        return score(hidden, targets)
    pieces = -(-t // chunk)
    size = -(-t // pieces)  # pieces of equal size, padded by fewer than `pieces` positions
    pad = pieces * size - t
    cut = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)).reshape(
        b, pieces, size, *a.shape[2:]).swapaxes(0, 1)
    logps, greedy = jax.lax.map(lambda hy: jax.checkpoint(score)(*hy), (cut(hidden), cut(targets)))
    uncut = lambda a: a.swapaxes(0, 1).reshape(b, pieces * size)[:, :t]
    return uncut(logps), uncut(greedy)


def next_token_logps(model: Transformer, tokens: Int[Array, "batch seq_plus_one"],
                     segment_ids: Int[Array, "batch seq"] | None = None, *, mesh: Mesh | None,
                     key: PRNGKeyArray | None = None) -> Float[Array, "batch seq"]:
    """log p(tokens[:, t + 1] | tokens[:, :t + 1]) of every row (within its segment, when packed)."""
    hidden, _ = model.forward(tokens[:, :-1], segment_ids, mesh=mesh, key=key)
    return target_logps(model, hidden, tokens[:, 1:])[0]


def cross_entropy(model: Transformer, tokens: Int[Array, "batch seq_plus_one"], weights: Float[Array, "batch seq"],
                  segment_ids: Int[Array, "batch seq"] | None = None, *, mesh: Mesh | None,
                  key: PRNGKeyArray | None = None) -> Float[Array, ""]:
    """Weighted mean next-token loss in fp32 (targets tokens[:, 1:], weighted by `weights`)."""
    logps = next_token_logps(model, tokens, segment_ids, mesh=mesh, key=key)
    total = jnp.sum(weights)
    return -jnp.sum(logps * weights) / jnp.where(total > 0, total, 1.0)
