"""Convert between julian checkpoints and Hugging Face Llama folders.

    python convert.py --to=hf --checkpoint=runs/tiny --out=hf/tiny
    python convert.py --to=julian --hf=hf/tiny --out=runs/imported

The Hugging Face folder loads with `transformers.AutoModelForCausalLM.from_pretrained` as
`LlamaForCausalLM` and `AutoTokenizer.from_pretrained` as a `LlamaTokenizer` that reproduces our
SentencePiece ids. Weights are safetensors (no pickle anywhere). `generation_config.json` ends a
reply at `</s>` or `<|im_end|>` (transformers' `generate`, vLLM), and `README.md` is a model card:
languages, license (`--license`), the training data and starting point, the chat format, how it
was evaluated, and the run's own results when its directory has them (`eval_results.json` written
by `evaluate.py --output`, held-out loss and `--eval_tasks` scores in `metrics.jsonl`).

Layout: our matmul weights are (in, out) for `x @ w`; torch's `nn.Linear` stores (out, in), so
every projection is transposed. Our rotary embedding already rotates halves, as Hugging Face's
does, so q and k need no permutation. Blocks are stacked on a leading layer axis here and
numbered `model.layers.{i}` there.

Import takes any Llama-family folder we can run exactly: `llama` (and `mistral` without a sliding
window, the same network), with grouped-query attention, tied embeddings, `rope_theta` and Llama 3's
`rope_scaling`, safetensors in one file or sharded (`model.safetensors.index.json`). The folder's
tokenizer files travel in the checkpoint (its tokenizer), and its `config.json` and
`generation_config.json` in the checkpoint's run config, so `--to=hf` writes them back. Anything
else (sliding-window attention, mixture of experts, biases, another rotary scaling, a head_dim
other than hidden_size / num_attention_heads) is refused in one line that names it.
"""

from __future__ import annotations

import json
import os
import textwrap
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from safetensors import SafetensorError, flax as safetensors_jax, numpy as safetensors_np
import yaml

import checkpoint
import cli
from hf_tokenizer import save_hf_tokenizer
from model import ModelConfig, Transformer, num_params
from runlog import check_writable, perplexity_text
from tokenizer import BOS_ID, DEFAULT_SYSTEM, EOS_ID, IM_END_ID, PAD_ID, UNK_ID, Tokenizer

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defined on demand, not at import: other scripts and the tests import this file."""
    flags.DEFINE_enum("to", None, ["hf", "julian"], "Direction: to a Hugging Face folder, or back to julian.")
    flags.DEFINE_string("checkpoint", None, "--to=hf: julian output dir (newest step) or Orbax step dir.")
    flags.DEFINE_string("hf", None, "--to=julian: a Hugging Face Llama folder (config.json, *.safetensors, "
                        "its tokenizer files).")
    flags.DEFINE_string("out", None, "Where to write: the HF folder, or the julian checkpoint dir.")
    flags.DEFINE_string("license", "other", "--to=hf: the model card's license (a Hugging Face Hub "
                        "license id, e.g. apache-2.0); the training data's licenses bound it.")


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


# The export's chat template renders what sft.py and dpo.py trained on and what `generate.py
# --chat` prompts with: <s>, the default system message when the conversation brings none, then
# ChatML. A conversation that ends with an assistant message (no generation prompt) ends at that
# reply's <|im_end|>, where the model stops: TRL and transformers trainers then put their loss on
# the reply and its <|im_end|>, the tokens sft.py and dpo.py train on, and not on a newline after.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if not messages or messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n' + " + json.dumps(DEFAULT_SYSTEM) + " + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}"
    "{% if not (loop.last and message['role'] == 'assistant' and not add_generation_prompt) %}"
    "{{ '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
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


# A chat reply ends at <|im_end|>; a plain continuation at </s>.
GENERATION_CONFIG = {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, IM_END_ID], "pad_token_id": PAD_ID}


def to_hf_state_dict(model: Transformer) -> dict[str, np.ndarray]:
    tensors = {theirs: _get(model, ours).T if transpose else _get(model, ours)
               for ours, theirs, transpose in MODEL_WEIGHTS if _get(model, ours) is not None}
    for ours, theirs, transpose in LAYER_WEIGHTS:
        stacked = _get(model.blocks, ours)
        for i in range(model.config.n_layers):
            tensors[theirs.format(i)] = stacked[i].T if transpose else stacked[i]
    return {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in tensors.items()}


def run_results(run_dir: str, step: int | None) -> tuple[dict, dict, dict]:
    """({task: {metric: value}}, {task: items scored}, {other metric: value}) a run directory
    holds for `step`: lm-eval's results from `evaluate.py --output=RUN/eval_results.json`, and the
    metrics.jsonl record of that step's evaluations (held-out loss, `--eval_tasks` scores as
    "task/metric")."""
    tasks: dict[str, dict[str, float]] = {}
    items: dict[str, int] = {}
    others: dict[str, float] = {}
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        # Evaluation records are the ones without a training loss or an event.
        for record in records:
            if record.get("step") != step or "loss" in record or "event" in record:
                continue
            for key, value in record.items():
                if key.startswith("eval_"):
                    others[key] = value
                elif "/" in key:
                    task, metric = key.split("/", 1)
                    tasks.setdefault(task, {})[metric] = value
    path = os.path.join(run_dir, "eval_results.json")
    if os.path.exists(path):
        with open(path) as f:
            for task, metrics in json.load(f).items():
                tasks.setdefault(task, {}).update(
                    {k.split(",")[0]: v for k, v in metrics.items()
                     if "," in k and "_stderr" not in k and isinstance(v, (int, float))})
                if "sample_len" in metrics:
                    items[task] = metrics["sample_len"]
    return tasks, items, others


def model_name(model_config: ModelConfig, run_config: dict) -> str:
    """julian-600M, julian-600M-sft, julian-600M-dpo: what llama.cpp names its GGUF after."""
    stage = next((f"-{k}" for k in ("dpo", "sft") if k in run_config), "")
    return f"julian-{num_params(model_config) / 1e6:.0f}M{stage}"


def _usage(chat: bool, context: int) -> list[str]:
    """The card's transformers snippet: a chat for a fine-tuned model, a continuation for a base
    model (which has not learnt to answer), with new tokens that fit the model's context."""
    new_tokens = min(64, context // 4)
    if chat:
        head = ["This model was fine-tuned to chat:", "", "```python"]
        body = f"""\
            chat = tokenizer.apply_chat_template([{{"role": "user", "content": "Bonjour !"}}], add_generation_prompt=True,
                                                 return_tensors="pt", return_dict=True)
            reply = model.generate(**chat, max_new_tokens={new_tokens}, do_sample=False)[0, chat["input_ids"].shape[1]:]
            print(tokenizer.decode(reply, skip_special_tokens=True))"""
    else:
        head = ["This is a pretrained (base) model: it continues text; the chat format is for the models "
                "fine-tuned from it (`sft.py`, `dpo.py`).", "", "```python"]
        body = f"""\
            text = tokenizer("Il était une fois", return_tensors="pt")
            out = model.generate(**text, max_new_tokens={new_tokens}, do_sample=False)
            print(tokenizer.decode(out[0], skip_special_tokens=True))"""
    return [*head, "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "tokenizer = AutoTokenizer.from_pretrained(PATH)", "model = AutoModelForCausalLM.from_pretrained(PATH)",
            *textwrap.dedent(body).splitlines(), "```"]


def model_card(model_config: ModelConfig, run_config: dict, step: int | None, license: str,
               results: tuple[dict, dict, dict] = ({}, {}, {})) -> str:
    """README.md for the Hugging Face folder: YAML front matter (what the Hub and llama.cpp read)
    and what a user needs: the data, the chat format, how it was evaluated and, if known, how it
    did (values as lm-eval gives them: accuracies in [0, 1])."""
    tasks, items, others = results
    name = model_name(model_config, run_config)
    stage = next((k for k in ("dpo", "sft") if k in run_config), None)
    data = (run_config.get(stage) or {}).get("train_data") if stage else run_config.get("train_data")
    data = data.split(",") if isinstance(data, str) else list(data or [])
    init_from = (run_config.get("run") or {}).get("init_from")
    front = {"language": ["en", "fr"], "license": license, "library_name": "transformers",
             "pipeline_tag": "text-generation", "tags": ["julian", "llama", "jax", "chatml"],
             "model_name": name}
    if tasks:
        front["model-index"] = [{"name": name, "results": [
            {"task": {"type": "text-generation", "name": "zero-shot, lm-evaluation-harness"},
             "dataset": {"name": task, "type": task},
             "metrics": [{"type": metric, "value": value} for metric, value in metrics.items()]}
            for task, metrics in tasks.items()]}]
    what = {"dpo": "aligned with DPO on preference pairs", "sft": "fine-tuned on ChatML conversations"}
    lines = [f"# {name}", "",
             f"A bilingual English/French LLaMA-style language model ({num_params(model_config):,} parameters: "
             f"{model_config.n_layers} layers, d_model {model_config.d_model}, {model_config.n_heads} heads, "
             f"context {model_config.max_seq_len} tokens, vocabulary {model_config.vocab_size:,}), "
             f"{what.get(stage, 'pretrained')} with julian (JAX + Equinox); step {step}.", "",
             "## Training data", ""]
    lines += [f"- `{d}`" for d in data] or ["- not recorded in the checkpoint"]
    if init_from:
        lines += ["", f"Started from the parameters of `{init_from}`."]
    lines += ["", "## Chat format", "",
              "ChatML after `<s>`; the tokenizer's chat template adds the default system message "
              f"(\"{DEFAULT_SYSTEM}\") when the conversation brings none:", "", "```",
              f"<s><|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nBonjour !<|im_end|>\n"
              "<|im_start|>assistant\n", "```", "",
              "A reply ends at `<|im_end|>`; `generation_config.json` stops generation there and at `</s>`.",
              "", *_usage(stage is not None, model_config.max_seq_len),
              "", "## Evaluation", "",
              "Zero-shot, with lm-evaluation-harness's own task definitions, through julian's `evaluate.py` "
              "(`python evaluate.py --checkpoint=RUN --output=RUN/eval_results.json`; the report's tasks: "
              "hellaswag, piqa, lambada_openai, arc_easy, arc_challenge, winogrande, boolq)."]
    if tasks:
        lines += ["", "| task | items | metric | value |", "| --- | --- | --- | --- |"]
        lines += [f"| {task} | {items.get(task, '')} | {metric} | "
                  f"{perplexity_text(value) if metric == 'perplexity' else f'{value:.4g}'} |"
                  for task, metrics in tasks.items() for metric, value in metrics.items()]
    else:
        lines += ["", "No results were found in the run's directory."]
    if others:
        lines += ["", "At this step, on held-out data: " + ", ".join(
            f"{k.removeprefix('eval_')} {v:.4g}" for k, v in others.items()) + "."]
    lines += ["", "## License", "",
              f"`{license}`, chosen at export; it must respect the licenses of the training data above."]
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n\n" + "\n".join(lines) + "\n"


def export_hf(model: Transformer, tokenizer: Tokenizer, out_dir: str, card: str | None = None,
              imported: dict | None = None) -> None:
    """The Hugging Face folder; `card` (model_card's) becomes its README.md. `imported` (a run
    config's checkpoint.IMPORTED entry, for a model that came from a Hugging Face folder) gives back that
    folder's config fields and generation config."""
    imported = imported or {}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(model.config, imported.get("config")), f, indent=2)
    generation = imported.get("generation_config", None if imported else GENERATION_CONFIG)
    if generation is not None:
        with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
            json.dump(generation, f, indent=2)
    if card is not None:
        with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)
    tensors = {k: jnp.asarray(v) for k, v in to_hf_state_dict(model).items()}
    safetensors_jax.save_file(tensors, os.path.join(out_dir, "model.safetensors"),
                              metadata={"format": "pt"})
    save_hf_tokenizer(tokenizer, out_dir, CHAT_TEMPLATE)


def _read_hf_tensors(hf_dir: str) -> dict[str, np.ndarray]:
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
    """(model, tokenizer, what else to keep: {checkpoint.IMPORTED: the folder's config.json and
    generation_config.json}) of a Hugging Face Llama folder."""
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
    tokenizer = Tokenizer.load(hf_dir)  # its tokenizer.json, else the tokenizer.model a julian export writes
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
    return model_from_hf_tensors(config, _read_hf_tensors(hf_dir), hf_dir), tokenizer, {checkpoint.IMPORTED: imported}


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


def main(argv):
    del argv
    checkpoint.quiet_logging(FLAGS["verbosity"].present)
    if not FLAGS.out:
        raise app.UsageError("--out is required")
    if FLAGS.to == "hf" and not FLAGS.checkpoint:
        raise app.UsageError("--to=hf needs --checkpoint=DIR (a train.py --output_dir)")
    if FLAGS.to == "julian" and not FLAGS.hf:
        raise app.UsageError("--to=julian needs --hf=HF_DIR")
    try:
        check_writable(FLAGS.out, "--out")
        if FLAGS.to == "julian" and checkpoint.latest_step(FLAGS.out) is not None:
            raise ValueError(f"--out={FLAGS.out} already holds checkpoint step {checkpoint.latest_step(FLAGS.out)}: "
                             "expected a new or empty directory for the imported model")
        if FLAGS.to == "hf":
            model, tokenizer_bytes, run_config = checkpoint.load(FLAGS.checkpoint)
            step = checkpoint.latest_step(FLAGS.checkpoint)
            metrics_dir = (run_config.get("run") or {}).get("metrics_dir") or FLAGS.checkpoint
            results = run_results(FLAGS.checkpoint, step)
            if os.path.abspath(metrics_dir) != os.path.abspath(FLAGS.checkpoint):
                results = tuple({**a, **b} for a, b in zip(results, run_results(metrics_dir, step)))
            card = model_card(model.config, run_config, step, FLAGS.license, results)
            export_hf(model, Tokenizer.from_bytes(tokenizer_bytes), FLAGS.out, card,
                      checkpoint.imported_of(run_config))
            print(f"wrote Hugging Face Llama folder {FLAGS.out}")
        else:
            started = time.perf_counter()
            model, tokenizer, kept = import_hf(FLAGS.hf)
            checkpoint.save(FLAGS.out, 0, model, tokenizer.model_bytes, kept)
            print(f"wrote julian checkpoint {FLAGS.out} (step 0): {describe(model.config)}, imported from "
                  f"{FLAGS.hf} in {time.perf_counter() - started:.1f} s")
    except (FileNotFoundError, ValueError) as e:  # bad input: say what, without a traceback
        raise app.UsageError(str(e)) from e


if __name__ == "__main__":
    define_flags()
    flags.mark_flag_as_required("to")
    cli.run(main)
