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

The format both ways (weight names, layout, config.json, which folders import) is hf_llama.py's.
An imported folder's tokenizer files travel in the checkpoint (its tokenizer), and its
`config.json` and `generation_config.json` in the checkpoint's run config, so `--to=hf` writes
them back.
"""

from __future__ import annotations

import json
import os
import textwrap
import time

import jax.numpy as jnp
from absl import app, flags
from safetensors import flax as safetensors_jax
import yaml

import checkpoint
import cli
from hf_llama import describe, hf_config, import_hf, to_hf_state_dict
from hf_tokenizer import save_hf_tokenizer
from model import ModelConfig, Transformer, num_params
from runlog import check_writable, perplexity_text
from tokenizer import BOS_ID, DEFAULT_SYSTEM, EOS_ID, IM_END_ID, PAD_ID, Tokenizer
from tokenizer_files import tokenizer_from_bytes

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



# A chat reply ends at <|im_end|>; a plain continuation at </s>.
GENERATION_CONFIG = {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, IM_END_ID], "pad_token_id": PAD_ID}




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
            export_hf(model, tokenizer_from_bytes(tokenizer_bytes), FLAGS.out, card,
                      checkpoint.imported_of(run_config))
            print(f"wrote Hugging Face Llama folder {FLAGS.out}")
        else:
            started = time.perf_counter()
            model, tokenizer, imported = import_hf(FLAGS.hf)
            checkpoint.save(FLAGS.out, 0, model, tokenizer.model_bytes, {checkpoint.IMPORTED: imported})
            print(f"wrote julian checkpoint {FLAGS.out} (step 0): {describe(model.config)}, imported from "
                  f"{FLAGS.hf} in {time.perf_counter() - started:.1f} s")
    except (FileNotFoundError, ValueError) as e:  # bad input: say what, without a traceback
        raise app.UsageError(str(e)) from e


if __name__ == "__main__":
    define_flags()
    flags.mark_flag_as_required("to")
    cli.run(main)
