"""The operations every layer of model.py shares: the mixed-precision matmul, SwiGLU, attention.

They fix the numerics and choose the kernels once, for all layers:

* `einsum`: every matmul, on `dtype` (bf16 by default) operands with fp32 accumulation, and a
  backward pass that also feeds bf16 operands with fp32 accumulation: plain autodiff of an
  fp32-accumulating dot hands the backward fp32 cotangents, which take the slow path on CPUs (AMX)
  and waste bandwidth everywhere. It names its outputs (QKV, ...) for model.py's remat policies.
* `swiglu`: the MLP's gate, whose backward keeps only its inputs in the compute dtype.
* `attend`: causal attention within segments. Plain einsums on a CPU; in a program for a TPU or
  GPU (`attention="auto"`, decided by the devices of the mesh that whoever builds the program
  passes down, so a TPU step compiled on a CPU gets the TPU's kernel) a fused Pallas kernel that
  takes the packed rows' segment ids and never builds the score array. The mesh is an argument,
  never ambient.

This file imports nothing of ours: no I/O, no flags. (Not kernels.py: that name would shadow the
`kernels` package, which transformers imports.)
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh
from jaxtyping import Array, Bool, Float, Int

# What `einsum` names its outputs, for remat policies to save: jax.checkpoint's dots_saveable cannot
# see the matmuls inside `einsum`'s custom VJP (it compiles to the same program as "full").
QKV, CONTEXT, OUT_PROJ, MLP_HIDDEN, MLP_OUT = "qkv_proj", "context", "out_proj", "mlp_hidden", "mlp_out"
# "auto" follows the target platform (see `attention_impl`); the others name one implementation.
ATTENTION_IMPLS = ("auto", "einsum", "dot_product", "splash", "flash", "cudnn")
# What "auto" runs on each backend: the fused kernel that honours segment ids there.
AUTO_ATTENTION = {"tpu": "splash", "gpu": "flash", "cpu": "einsum"}
# The kernels' tile along the sequence: TPU splash attention takes multiples of 128 only.
KERNEL_BLOCK = 128
# Queries per block of the einsum path's causal attention (`attend`).
QUERY_BLOCK = 128


# --------------------------------------------------------------------------------------------
# Mixed-precision matmul.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _einsum(spec: str, a: Array, b: Array, dtype: str) -> Float[Array, "..."]:
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _einsum_fwd(spec, a, b, dtype):
    return _einsum(spec, a, b, dtype), (a, b)


def _einsum_bwd(spec, dtype, residuals, g):
    a, b = residuals
    inputs, out = spec.split("->")
    sa, sb = inputs.split(",")
    g = g.astype(dtype)
    da = jnp.einsum(f"{out},{sb}->{sa}", g, b.astype(dtype), preferred_element_type=jnp.float32)
    db = jnp.einsum(f"{out},{sa}->{sb}", g, a.astype(dtype), preferred_element_type=jnp.float32)
    return da.astype(a.dtype), db.astype(b.dtype)


_einsum.defvjp(_einsum_fwd, _einsum_bwd)


def einsum(spec: str, a: Array, b: Array, dtype: str, name: str | None = None) -> Float[Array, "..."]:
    """`jnp.einsum(spec, a, b)` on `dtype` operands, accumulated in fp32; returned in fp32, or, when
    `name`d, rounded to `dtype` and named for the remat policies (model.REMAT_SAVES) to keep.

    Valid for specs where every index of an operand appears in the other operand or the output
    (true of every projection and attention product of the model), so the gradients are einsums too.
    A named output is rounded first so that what remat keeps is in the compute dtype: half the
    bytes of the fp32 accumulator (MaxText's choice too). Unnamed: the attention scores ([heads,
    seq, seq] per row: cheaper to recompute than to keep) and the logits.
    """
    out = _einsum(spec, a, b, dtype)
    return out if name is None else checkpoint_name(out.astype(dtype), name)


# --------------------------------------------------------------------------------------------
# SwiGLU.


@jax.custom_vjp
def swiglu(gate: Float[Array, "*batch d_ff"], up: Float[Array, "*batch d_ff"]) -> Float[Array, "*batch d_ff"]:
    """silu(gate) * up in fp32, returned in the inputs' dtype. Its backward keeps only `gate` and
    `up` (the compute dtype) and recomputes the rest: plain autodiff would keep the fp32 upcasts
    and silu's intermediates, four or five fp32 d_ff-wide arrays per token and layer without remat
    (20.8 of the 600m's 32.4 GiB per v4 chip)."""
    return (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(gate.dtype)


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, g):
    gate, up = residuals
    x, g = gate.astype(jnp.float32), g.astype(jnp.float32)
    sigmoid = jax.nn.sigmoid(x)
    d_gate = g * up.astype(jnp.float32) * sigmoid * (1 + x * (1 - sigmoid))  # d silu(x)/dx
    return d_gate.astype(gate.dtype), (g * x * sigmoid).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


# --------------------------------------------------------------------------------------------
# Attention.


# What attention is restricted by: the segment id of each position of a packed row, or (evaluate.py's
# rows, whose continuations branch from a shared context) an explicit [batch, q, k] mask.
Segments = Int[Array, "batch seq"] | Bool[Array, "batch seq seq"]


def attention_mask(q_segments: Int[Array, "batch q"], kv_segments: Int[Array, "batch k"],
                   q_positions: Int[Array, "batch q"], kv_positions: Int[Array, "batch k"]
                   ) -> Bool[Array, "batch q k"]:
    """A query sees keys of its own segment at the same or an earlier position."""
    same = q_segments[:, :, None] == kv_segments[:, None, :]
    return same & (kv_positions[:, None, :] <= q_positions[:, :, None])


def target_platform(mesh: Mesh | None) -> str:
    """The platform a program runs on: that of the devices of `mesh` (which may be a TPU
    topology's while this host is a CPU: a TPU step compiled here must get the TPU's kernels, not
    interpreted ones), or with no mesh (one device) the host's default backend."""
    platform = jax.default_backend() if mesh is None else mesh.abstract_mesh.abstract_device.platform
    return "gpu" if platform in ("cuda", "rocm") else platform


def attention_impl(requested: str, seq_len: int, backend: str | None = None) -> str:
    """What runs for `requested`: itself, or for "auto" the fused kernel of `backend` (by default
    the host's; AUTO_ATTENTION) when the sequence is a whole number of kernel tiles, else einsum
    (the short rows of a unit test or an evaluation bucket)."""
    if requested != "auto":
        return requested
    impl = AUTO_ATTENTION.get(backend or target_platform(None), "einsum")
    return impl if impl == "einsum" or seq_len % KERNEL_BLOCK == 0 else "einsum"


def _per_device(fn, mesh: Mesh | None, *args: Array) -> Array:
    """`fn` on each device's rows of the batch. A Pallas kernel is a custom call XLA cannot
    partition (it would gather the whole batch onto every device, or refuse), so under a mesh
    the kernel runs under shard_map over the batch's mesh axes."""
    if mesh is None:
        return fn(*args)
    spec = jax.sharding.PartitionSpec(mesh.axis_names)
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * len(args), out_specs=spec, check_vma=False)(*args)


def _splash_kernel(heads: int, seq_len: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    # The largest tile that divides the sequence: bigger tiles keep the TPU's matrix units busier.
    block = next(b for b in (512, 256, KERNEL_BLOCK) if seq_len % b == 0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                              block_kv_dq=block)
    mask = masks.MultiHeadMask([masks.CausalMask((seq_len, seq_len))] * heads)
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash(q: Float[Array, "batch heads seq head_dim"], k: Float[Array, "batch kv_heads seq head_dim"],
            v: Float[Array, "batch kv_heads seq head_dim"], segments: Int[Array, "batch seq"], platform: str
            ) -> Float[Array, "batch seq heads head_dim"]:
    """TPU Pallas splash attention, causal within segments (interpreted on other platforms).

    Grouped-query K/V go in as they are: the MHA kernel takes fewer K/V heads than query heads
    (query head h reads K/V head h // group through its block index maps, and its dK/dV kernel
    sums over the group), so no K/V is repeated in memory and one kernel call serves all heads."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    b, h, t, d = q.shape
    kernel = _splash_kernel(h, t, interpret=platform != "tpu")
    q = q / math.sqrt(d)  # the kernel does not scale the scores
    out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=SegmentIds(q=s, kv=s)))(q, k, v, segments)
    return out.transpose(0, 2, 1, 3)


def _flash(q: Float[Array, "batch heads seq head_dim"], k: Float[Array, "batch kv_heads seq head_dim"],
           v: Float[Array, "batch kv_heads seq head_dim"], segments: Int[Array, "batch seq"], platform: str
           ) -> Float[Array, "batch seq heads head_dim"]:
    """Pallas GPU (Triton) flash attention, causal within segments (interpreted on other platforms).

    The kernel takes as many K/V heads as query heads: grouped-query K/V are repeated for it (a
    per-device [batch, seq, heads, head_dim] copy of each; attention=cudnn takes them unrepeated)."""
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    swap = lambda a: a.transpose(0, 2, 1, 3)  # it wants (batch, seq, heads, head_dim)
    k, v = (_repeat_kv(a, q.shape[1]) for a in (k, v))
    return gpu_attention.mha(swap(q), swap(k), swap(v), segments, sm_scale=1 / math.sqrt(q.shape[-1]),
                             causal=True, interpret=platform != "gpu")


def _repeat_kv(x: Float[Array, "batch kv_heads seq head_dim"], heads: int) -> Float[Array, "batch heads seq head_dim"]:
    """Each K/V head repeated for the query heads of its group (query head i reads K/V head
    i // group, as Hugging Face's repeat_kv)."""
    return x if x.shape[1] == heads else jnp.repeat(x, heads // x.shape[1], axis=1)


def attend(q: Float[Array, "batch heads seq head_dim"], k: Float[Array, "batch kv_heads kv head_dim"],
           v: Float[Array, "batch kv_heads kv head_dim"], segments: Segments, impl: str, dtype: str,
           mesh: Mesh | None = None) -> Float[Array, "batch seq heads head_dim"]:
    """Causal attention within segments (a token sees earlier tokens of its own segment), in `dtype`.
    Given a [batch, q, k] boolean mask instead of segment ids (evaluate.py's rows, where every
    continuation branches from a shared context; a KV cache's slots), the einsum path applies it
    as it is.

    `segments` numbers the runs of a packed row (each run a document); `impl` is one of
    ATTENTION_IMPLS. einsum builds the scores, QUERY_BLOCK queries at a time against the keys up to
    the block's end (all of a KV cache's slots); splash (TPU) and flash
    (GPU) are Pallas kernels that take segment ids and never build them; cudnn is cuDNN's fused
    kernel through jax.nn.dot_product_attention, which takes no segment ids, so the segments
    reach it as a [batch, 1, seq, seq] mask (a bias in cuDNN); dot_product is the same call on
    XLA's own path. `mesh` is the mesh the program is built for (None: one device): "auto" picks
    its platform's kernel, and a kernel runs per device under it. K/V may have fewer heads than Q
    (grouped-query attention: query head i reads K/V head i // (heads // kv_heads)).
    """
    b, h, t, d = q.shape
    platform = target_platform(mesh)
    impl = "einsum" if segments.ndim == 3 else attention_impl(impl, t, platform)
    if impl in ("splash", "flash") and t % KERNEL_BLOCK:
        raise ValueError(f"attention={impl} needs a sequence length that is a multiple of "
                         f"{KERNEL_BLOCK}, got {t}: use attention=auto or einsum for this shape")
    q, k, v = (a.astype(dtype) for a in (q, k, v))
    if segments.ndim == 2:
        segments = segments.astype(jnp.int32)
    if impl in ("splash", "flash"):
        kernel = functools.partial(_splash if impl == "splash" else _flash, platform=platform)
        return _per_device(kernel, mesh, q, k, v, segments)
    if impl in ("cudnn", "dot_product"):
        swap = lambda a: a.transpose(0, 2, 1, 3)  # it wants (batch, seq, heads, head_dim)
        same = segments[:, None, :, None] == segments[:, None, None, :]
        return jax.nn.dot_product_attention(swap(q), swap(k), swap(v), mask=same, is_causal=True,
                                            implementation="cudnn" if impl == "cudnn" else "xla")
    index = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = segments if segments.ndim == 3 else attention_mask(segments, segments, index, index)
    if k.shape[2] != t:  # a KV cache's slots: no order between query and slot index to exploit
        return _grouped_attention(q, k, v, mask, dtype).transpose(0, 2, 1, 3)
    # A square mask is causal in every use (segments; packed scoring's ancestors; a prefill into
    # an empty cache), so a block of queries reads keys up to its own end only: about half the
    # scores at length 1,024, where SmolLM2-135M's scoring pass ran 1.35x faster on a 2-core CPU.
    blocks = [_grouped_attention(q[:, :, s:s + QUERY_BLOCK], k[:, :, :s + QUERY_BLOCK], v[:, :, :s + QUERY_BLOCK],
                                 mask[:, s:s + QUERY_BLOCK, :s + QUERY_BLOCK], dtype) for s in range(0, t, QUERY_BLOCK)]
    return jnp.concatenate(blocks, axis=2).transpose(0, 2, 1, 3)


def _grouped_attention(q: Float[Array, "batch heads q head_dim"], k: Float[Array, "batch kv_heads k head_dim"],
                       v: Float[Array, "batch kv_heads k head_dim"], mask: Bool[Array, "batch q k"],
                       dtype: str) -> Float[Array, "batch heads q head_dim"]:
    """Softmax attention in einsums, each K/V head read by its group of query heads as they are
    (the group is a free axis of the products, so no K/V is repeated)."""
    b, h, t, d = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(b, kv_heads, h // kv_heads, t, d)
    scores = einsum("bkgqd,bkcd->bkgqc", q, k, dtype) / math.sqrt(d)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    return einsum("bkgqc,bkcd->bkgqd", probs, v, dtype, CONTEXT).reshape(b, h, t, d)
