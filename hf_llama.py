"""The Hugging Face Llama format: its weight names and config.json, both ways, and the import of
a folder into our model. A library (no flags, no output): checkpoint.py imports a folder given as
--init_from or --checkpoint, and convert.py, the script, imports and exports with it.

Layout: our matmul weights are (in, out) for `x @ w`; torch's `nn.Linear` stores (out, in), so
every projection is transposed. Our rotary embedding already rotates halves, as Hugging Face's
does, so q and k need no permutation. Blocks are stacked on a leading layer axis here and
numbered `model.layers.{i}` there.

Import takes any Llama-family folder we can run exactly: `llama` (and `mistral` without a sliding
window, the same network), with grouped-query attention, tied embeddings, `rope_theta` and Llama 3's
`rope_scaling`, safetensors in one file or sharded (`model.safetensors.index.json`). Anything else
(sliding-window attention, mixture of experts, biases, another rotary scaling, a head_dim other
than hidden_size / num_attention_heads) is refused in one line that names it.
"""

from __future__ import annotations

import json
import os

import equinox as eqx
import jax
import numpy as np
from safetensors import SafetensorError, numpy as safetensors_np

from model import ModelConfig, Transformer
from tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer
from tokenizer_files import open_tokenizer


# (ours, Hugging Face's, transpose?) for the weights outside the blocks...
MODEL_WEIGHTS = (
    ("embed", "model.embed_tokens.weight", False),
    ("final_norm.weight", "model.norm.weight", False),
    ("lm_head", "lm_head.weight", True),
)
# ...and for each block's; {} is the layer number.
LAYER_WEIGHTS = (
    ("attn_norm.weight", "model.layers.{}.input_layernorm.weight", False),
    ("attn.wq", "model.layers.{}.self_attn.q_proj.weight", True),
    ("attn.wk", "model.layers.{}.self_attn.k_proj.weight", True),
    ("attn.wv", "model.layers.{}.self_attn.v_proj.weight", True),
    ("attn.wo", "model.layers.{}.self_attn.o_proj.weight", True),
    ("mlp_norm.weight", "model.layers.{}.post_attention_layernorm.weight", False),
    ("mlp.w_gate", "model.layers.{}.mlp.gate_proj.weight", True),
    ("mlp.w_up", "model.layers.{}.mlp.up_proj.weight", True),
    ("mlp.w_down", "model.layers.{}.mlp.down_proj.weight", True),
)



def _get(obj, dotted: str):
    for name in dotted.split("."):
        obj = getattr(obj, name)
    return obj


def hf_config(config: ModelConfig, imported: dict | None = None) -> dict:
    """config.json of the Hugging Face folder. A model imported from one (`imported`: that folder's
    config.json, kept in the checkpoint) keeps its own fields (token ids, name, ...) beside ours."""
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        factor, low, high, original = config.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": config.rope_theta, "factor": factor,
                "low_freq_factor": low, "high_freq_factor": high, "original_max_position_embeddings": original}
    ours = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        # transformers 5 reads rope_parameters; older versions rope_theta and rope_scaling.
        "rope_theta": config.rope_theta,
        "rope_scaling": {k: v for k, v in rope.items() if k != "rope_theta"} if config.rope_scaling else None,
        "rope_parameters": rope,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings,
        "dtype": "float32",
    }
    if imported is not None:
        # Dropped: what this export states differently (the dtype of the weights, the rotary spelling).
        kept = {k: v for k, v in imported.items() if k not in ("torch_dtype", "sliding_window", "transformers_version")}
        return {**kept, **ours}
    return {**ours, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "unk_token_id": UNK_ID}



def to_hf_state_dict(model: Transformer) -> dict[str, np.ndarray]:
    tensors = {theirs: _get(model, ours).T if transpose else _get(model, ours)
               for ours, theirs, transpose in MODEL_WEIGHTS if _get(model, ours) is not None}
    for ours, theirs, transpose in LAYER_WEIGHTS:
        stacked = _get(model.blocks, ours)
        for i in range(model.config.n_layers):
            tensors[theirs.format(i)] = stacked[i].T if transpose else stacked[i]
    return {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in tensors.items()}


def read_hf_tensors(hf_dir: str) -> dict[str, np.ndarray]:
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"{index} is not a safetensors index ({e!r}): expected a JSON object with a "
                             "weight_map of tensor names to shard files") from None
    else:
        files = ["model.safetensors"]
    tensors = {}
    for name in files:
        path = os.path.join(hf_dir, name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} does not exist: expected the model's safetensors weights")
        try:
            tensors.update(safetensors_np.load_file(path))  # host arrays (bf16 too, through ml_dtypes)
        except SafetensorError as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e}): expected the model's "
                             "weights, whole") from None
    return tensors


SUPPORTED = ("a Llama (model_type llama, or mistral without a sliding window): grouped-query attention, tied "
             "embeddings, rope_theta and rope_type default or llama3, no biases")
# config.json keys that announce a mixture of experts (Mixtral, Qwen-MoE, DeepSeek, ...).
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")


def rope_config(hf: dict) -> tuple[float, tuple[float, float, float, int] | None, str | None]:
    """(rope_theta, Llama 3 scaling or None, a problem or None) from either spelling: transformers
    5's `rope_parameters`, or the older top-level `rope_theta` and `rope_scaling`."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return theta, None, None
    if kind != "llama3":
        return theta, None, f"rope_type={kind!r} (only default and llama3 rotary embeddings are supported)"
    names = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    if any(name not in rope for name in names):
        return theta, None, f"rope_type llama3 without {[n for n in names if n not in rope]}"
    return theta, (float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
                   int(rope["original_max_position_embeddings"])), None


def model_config_from_hf(hf: dict, path: str, overrides: dict | None = None) -> ModelConfig:
    """The ModelConfig of a Hugging Face config.json; what we cannot run exactly is refused in one
    line naming it. `overrides` sets execution fields (dtype, attention, ...)."""
    problems = []
    model_type, architectures = hf.get("model_type"), hf.get("architectures") or []
    if model_type not in ("llama", "mistral"):
        problems.append(f"model_type={model_type!r}")
    if any(a not in ("LlamaForCausalLM", "MistralForCausalLM") for a in architectures):
        problems.append(f"architectures={architectures}")
    if hf.get("sliding_window") is not None:
        problems.append(f"sliding_window={hf['sliding_window']} (sliding-window attention)")
    experts = [k for k in MOE_KEYS if hf.get(k)]
    if experts:
        problems.append(f"{experts[0]}={hf[experts[0]]} (a mixture of experts)")
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    if hf.get("head_dim") not in (None, hidden // heads) or hidden % heads:
        problems.append(f"head_dim={hf.get('head_dim', hidden / heads)} with hidden_size={hidden} and "
                        f"num_attention_heads={heads} (head_dim must be hidden_size / num_attention_heads)")
    for bias in ("attention_bias", "mlp_bias"):
        if hf.get(bias):
            problems.append(f"{bias}=true (projections with biases)")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (the MLP is SwiGLU: silu)")
    theta, scaling, problem = rope_config(hf)
    if problem:
        problems.append(problem)
    if problems:
        raise ValueError(f"{path}: cannot import: {'; '.join(problems)}; supported: {SUPPORTED}")
    kv_heads = hf.get("num_key_value_heads") or heads
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hidden, n_layers=hf["num_hidden_layers"], n_heads=heads,
        n_kv_heads=None if kv_heads == heads else kv_heads, d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048), rope_theta=theta, rope_scaling=scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), norm_eps=hf.get("rms_norm_eps", 1e-6),
        **(overrides or {}))


def import_hf(hf_dir: str, overrides: dict | None = None) -> tuple[Transformer, Tokenizer, dict]:
    """(model, tokenizer, what a checkpoint keeps of the folder: its path, config.json and
    generation_config.json) of a Hugging Face Llama folder."""
    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} does not exist: expected a Hugging Face Llama folder")
    with open(config_path) as f:
        hf = json.load(f)
    if "model_type" not in hf:
        raise ValueError(f"{config_path} names no model_type: expected a Hugging Face Llama folder (a julian "
                         "run converts the other way, with --to=hf --checkpoint)")
    try:
        config = model_config_from_hf(hf, config_path, overrides)
    except KeyError as e:
        raise ValueError(f"{config_path} has no {e}: expected a Hugging Face Llama config") from None
    tokenizer = open_tokenizer(hf_dir)  # its tokenizer.json, else the tokenizer.model a julian export writes
    # The embedding may have more rows than the tokenizer has tokens (a table padded to a round
    # size), never fewer.
    if tokenizer.vocab_size > config.vocab_size:
        which = "tokenizer.json" if os.path.exists(os.path.join(hf_dir, "tokenizer.json")) else "tokenizer.model"
        raise ValueError(f"{hf_dir}/{which} has {tokenizer.vocab_size} pieces, config.json's vocab_size is only "
                         f"{config.vocab_size}: expected the tokenizer the model was trained with")
    imported = {"path": os.path.abspath(hf_dir), "config": hf}
    generation = os.path.join(hf_dir, "generation_config.json")
    if os.path.exists(generation):
        with open(generation) as f:
            imported["generation_config"] = json.load(f)
    return model_from_hf_tensors(config, read_hf_tensors(hf_dir), hf_dir), tokenizer, imported


def model_from_hf_tensors(config: ModelConfig, tensors: dict[str, jax.Array | np.ndarray], where: str) -> Transformer:
    """Our model of `config` holding a Hugging Face Llama state dict (names as in its safetensors;
    `where` names the source in errors)."""
    model = eqx.filter_eval_shape(Transformer, config, jax.random.key(0))

    def tensor(name: str, shape: tuple[int, ...], transpose: bool) -> np.ndarray:
        """The named tensor as stored (checked against our `shape`); a view, not yet copied."""
        value = tensors.get(name)
        if value is None:
            raise ValueError(f"{where}: tensor {name} is missing")
        expected = tuple(reversed(shape)) if transpose else tuple(shape)
        if value.shape != expected:
            raise ValueError(f"{where}: tensor {name} has shape {value.shape}, expected {expected}")
        value = np.asarray(value)
        return value.T if transpose else value

    # On the host in NumPy, each layer's tensor converted, transposed and stacked in one copy into
    # its slot, then one device_put: eager jax ops per tensor took seconds at 135M.
    paths, values = [], []
    for ours, theirs, transpose in MODEL_WEIGHTS:
        if _get(model, ours) is not None:  # a tied model has no lm_head (transformers ties it too)
            paths.append(ours)
            values.append(tensor(theirs, _get(model, ours).shape, transpose).astype(np.float32))
    for ours, theirs, transpose in LAYER_WEIGHTS:
        stacked = np.empty(_get(model.blocks, ours).shape, np.float32)
        for i in range(config.n_layers):
            stacked[i] = tensor(theirs.format(i), stacked.shape[1:], transpose)
        paths.append("blocks." + ours)
        values.append(stacked)
    return eqx.tree_at(lambda m: [_get(m, p) for p in paths], model, jax.device_put(values))


def describe(config: ModelConfig) -> str:
    """The architecture in a few words, for the line that says a folder was imported."""
    parts = [f"{config.n_layers} layers", f"d_model {config.d_model}",
             f"{config.n_heads} heads" if config.kv_heads == config.n_heads
             else f"{config.n_heads} query / {config.kv_heads} K/V heads", f"vocabulary {config.vocab_size:,}"]
    if config.tie_embeddings:
        parts.append("tied embeddings")
    if config.rope_scaling:
        parts.append("Llama 3 rope scaling")
    return ", ".join(parts)
