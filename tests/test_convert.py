"""convert.py: julian <-> Hugging Face Llama, checked against `transformers` itself.

The reference is always Hugging Face: its `LlamaForCausalLM` must compute our logits from the
exported folder, its tokenizer must give our SentencePiece ids, and a Llama it wrote (tied
embeddings) must import into a model that computes its logits.
"""

import dataclasses
import json
import os
import re
import shutil
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as safetensors_np

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import checkpoint  # noqa: E402
import convert  # noqa: E402
import hf_llama  # noqa: E402
import forked
from conftest import DATA_FILES, REPO, run_script  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from tokenizer import BOS_ID, DEFAULT_SYSTEM, EOS_ID, IM_END_ID, IM_START_ID, PAD_ID, UNK_ID, Tokenizer  # noqa: E402
from tokenizer_files import open_tokenizer, tokenizer_from_bytes

ATOL = 1e-4  # fp32 on both sides: a wrong layout is off by O(1), rounding by ~1e-6

CODE = (
    "def mean(xs: list[float]) -> float:\n"
    "\t# tab-indented comment\n"
    "    if not xs:\n"
    "        raise ValueError('empty')  # two spaces before\n"
    "\n\n"
    "    return sum(xs) / len(xs)   \n"
)
HARD_TEXTS = (
    CODE,
    "Élève à l'école, garçon naïf, cœur, août ; « guillemets » — “quotes” ½\u00a0nbsp",
    "Emoji 🎉👩‍💻 and CJK 中文, then \ttabs\t\tand   runs of spaces  ",
    "Digits: 1572, 3.14159, 2048x2048, 0007, -42, 1er août 1572",
    " leading space, trailing newline\n",
    "\n\nnewlines first",
)


def _logits(model: Transformer, tokens) -> np.ndarray:
    return np.asarray(eqx.filter_jit(lambda m, t: m(t))(model, jnp.asarray(tokens, jnp.int32)))


def _hf_logits(hf_model, tokens, attention_mask=None) -> np.ndarray:
    with torch.no_grad():
        out = hf_model(input_ids=torch.as_tensor(np.asarray(tokens), dtype=torch.long),
                       attention_mask=None if attention_mask is None else torch.as_tensor(attention_mask))
    return out.logits.float().numpy()


def _with_dtype(model: Transformer, dtype: str) -> Transformer:
    """The same weights under another activation dtype (an execution choice, not a weight)."""
    config = dataclasses.replace(model.config, dtype=dtype)
    like = eqx.filter_eval_shape(Transformer, config, jax.random.key(0))
    return jax.tree.unflatten(jax.tree.structure(like), jax.tree.leaves(model))


def _assert_same_leaves(a: Transformer, b: Transformer) -> None:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for path_leaf, y in zip(jax.tree_util.tree_leaves_with_path(a), lb):
        path, x = path_leaf
        name = jax.tree_util.keystr(path)
        assert x.shape == y.shape and x.dtype == y.dtype, name
        assert np.array_equal(np.asarray(x), np.asarray(y)), name


def _architecture(config: ModelConfig) -> tuple:
    return (config.vocab_size, config.d_model, config.n_layers, config.n_heads, config.d_ff,
            config.max_seq_len, config.rope_theta, config.norm_eps)


def _randomized(model: Transformer, seed: int) -> Transformer:
    """Weights at a trained model's scale (unit-ish activations, O(1) logits), so attention and
    every projection move the logits well beyond ATOL; norm weights random and all different,
    so a swapped or misplaced norm shows."""
    def leaves(m):
        b = m.blocks
        return (m.embed, m.lm_head, b.attn.wq, b.attn.wk, b.attn.wv, b.attn.wo, b.mlp.w_gate,
                b.mlp.w_up, b.mlp.w_down, m.final_norm.weight, b.attn_norm.weight, b.mlp_norm.weight)

    old = leaves(model)
    keys = jax.random.split(jax.random.key(seed), len(old))
    new = [jax.random.normal(keys[0], old[0].shape)]  # embedding: unit scale
    new += [jax.random.normal(k, x.shape) / np.sqrt(x.shape[-2]) for k, x in zip(keys[1:9], old[1:9])]
    new += [1.0 + 0.5 * jax.random.normal(k, x.shape) for k, x in zip(keys[9:], old[9:])]
    return eqx.tree_at(leaves, model, new)


# --------------------------------------------------------------------------------------------
# Fixtures: a random model exported in-process, the shared trained run exported by the CLI.


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_path) -> Tokenizer:
    return open_tokenizer(tiny_tokenizer_path)


@pytest.fixture(scope="module")
def random_model(tok) -> Transformer:
    # Non-default rope_theta, norm_eps and context, so the exported config must carry them.
    config = ModelConfig(vocab_size=tok.vocab_size, d_model=128, n_layers=2, n_heads=2, d_ff=256,
                         max_seq_len=64, rope_theta=50_000.0, norm_eps=1e-5, dtype="float32")
    return _randomized(Transformer(config, jax.random.key(0)), seed=1)


@pytest.fixture(scope="module")
def random_hf_dir(random_model, tok, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("hf_random"))
    convert.export_hf(random_model, tok, out)
    return out


@pytest.fixture(scope="module")
def random_hf_model(random_hf_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(random_hf_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def trained(tiny_run):
    model, tokenizer_bytes, _ = checkpoint.load(tiny_run, model_overrides={"dtype": "float32"})
    return model, tokenizer_bytes


@pytest.fixture(scope="module")
def trained_hf_dir(tiny_run, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("hf_trained"))
    run_script("convert.py", "--to=hf", f"--checkpoint={tiny_run}", f"--out={out}")
    return out


@pytest.fixture(scope="module")
def trained_hf_tokenizer(trained_hf_dir):
    return transformers.AutoTokenizer.from_pretrained(trained_hf_dir)


def _data_lines(per_file: int, min_chars: int = 40) -> list[str]:
    lines = []
    for path in DATA_FILES:
        with open(path, encoding="utf-8") as f:
            kept = [line.rstrip("\n") for line in f if len(line.strip()) >= min_chars]
        lines += kept[:per_file]
    return lines


# --------------------------------------------------------------------------------------------
# 1. Random weights: Hugging Face computes our logits from the exported folder.


def test_export_of_random_weights_loads_as_llama_and_gives_our_logits(random_model, random_hf_dir,
                                                                       random_hf_model):
    assert type(random_hf_model).__name__ == "LlamaForCausalLM"
    assert isinstance(random_hf_model, transformers.LlamaForCausalLM)
    files = sorted(os.listdir(random_hf_dir))
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)

    tokens = np.random.default_rng(0).integers(0, random_model.config.vocab_size, (3, 24))
    ours, theirs = _logits(random_model, tokens), _hf_logits(random_hf_model, tokens)
    assert ours.shape == theirs.shape == (3, 24, random_model.config.vocab_size)
    assert np.std(ours) > 0.3  # the comparison is not between near-zero numbers
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=ATOL)


@pytest.mark.parametrize("length", [1, 7, 64])
def test_export_of_random_weights_matches_at_every_length_up_to_the_context(
        random_model, random_hf_model, length):
    tokens = np.random.default_rng(length).integers(0, random_model.config.vocab_size, (1, length))
    np.testing.assert_allclose(_logits(random_model, tokens), _hf_logits(random_hf_model, tokens),
                               rtol=0, atol=ATOL)


# --------------------------------------------------------------------------------------------
# 2. Trained weights, exported by the CLI as a user would, on real EN and FR text.


def test_cli_export_of_the_trained_run_gives_our_ids_and_logits_on_english_and_french(
        trained, trained_hf_dir, trained_hf_tokenizer):
    model, tokenizer_bytes = trained
    ours_tok = tokenizer_from_bytes(tokenizer_bytes)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(trained_hf_dir, dtype=torch.float32).eval()
    assert isinstance(hf_model, transformers.LlamaForCausalLM)

    lines = _data_lines(per_file=25)
    assert {os.path.basename(p)[:2] for p in DATA_FILES} == {"en", "fr"}
    for text in lines:  # Hugging Face adds <s>, as LLaMA; we add it when asked
        assert trained_hf_tokenizer(text).input_ids == ours_tok.encode(text, bos=True), text[:80]

    # Two lines per file, a batch right-padded to the longest: causal attention means padding
    # changes no logit at a real position, in either model.
    texts = [t for i, t in enumerate(lines) if i % 25 < 2]
    seqs = [trained_hf_tokenizer(t).input_ids[:model.config.max_seq_len] for t in texts]
    width = max(map(len, seqs))
    tokens = np.full((len(seqs), width), PAD_ID)
    valid = np.zeros((len(seqs), width), bool)
    for row, ids in enumerate(seqs):
        tokens[row, :len(ids)], valid[row, :len(ids)] = ids, True
    ours = _logits(model, tokens)[valid]
    theirs = _hf_logits(hf_model, tokens, valid.astype(np.int64))[valid]
    assert ours.shape == theirs.shape == (valid.sum(), model.config.vocab_size)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=ATOL)
    # Trained, so the logits mean something: the next token of real text is likelier than chance.
    targets = tokens[:, 1:][valid[:, 1:]]
    log_probs = jax.nn.log_softmax(_logits(model, tokens)[:, :-1][valid[:, 1:]])
    assert -np.mean(np.take_along_axis(np.asarray(log_probs), targets[:, None], 1)) < np.log(
        model.config.vocab_size) - 1.0


# --------------------------------------------------------------------------------------------
# 3. The exported tokenizer: SentencePiece's ids on hard text.


@pytest.mark.parametrize("system", [None, "Réponds en une phrase."])
def test_exported_chat_template_gives_generate_chat_ids_and_sft_training_ids(tok, random_hf_dir, system):
    """apply_chat_template on the export = `generate.py --chat`'s prompt (<s>, the default system
    message when none is given, ChatML), and a whole conversation = what SFT trained on, up to
    the last reply's <|im_end|>."""
    import chat_data
    import generate

    hf = transformers.AutoTokenizer.from_pretrained(random_hf_dir)
    turns = [{"role": "user", "content": "Écris f(x) = 2*x\n  en Python"}, {"role": "assistant", "content": " def f(x): 🎉"},
             {"role": "user", "content": "Et en Rust ?"}]
    given = ([{"role": "system", "content": system}] if system else []) + turns
    rendered = [{"role": "system", "content": system or DEFAULT_SYSTEM}] + turns  # generate.py's
    ids = lambda messages, prompt: hf.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True,
                                                          return_dict=True)["input_ids"]
    assert ids(given, True) == generate.chat_prompt(tok, rendered)
    assert ids(given, True)[:2] == [BOS_ID, IM_START_ID]
    example, _ = chat_data.render(tok, [*rendered, {"role": "assistant", "content": "Voilà."}])
    assert ids([*given, {"role": "assistant", "content": "Voilà."}], False) == example.ids[:-1].tolist()
    assert example.mask[-2] and not example.mask[-1]  # what is left out is the unsupervised newline


def test_exported_tokenizer_gives_sentencepiece_ids_on_accents_emoji_code_and_digits(
        trained, trained_hf_dir, trained_hf_tokenizer):
    ours_tok = tokenizer_from_bytes(trained[1])
    with open(os.path.join(trained_hf_dir, "tokenizer.model"), "rb") as f:
        assert f.read() == trained[1]
    hf = trained_hf_tokenizer
    assert (hf.pad_token_id, hf.unk_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2, 3)
    for text in HARD_TEXTS:
        ids = ours_tok.encode(text)
        assert hf(text, add_special_tokens=False).input_ids == ids, repr(text)
        assert hf(text).input_ids == [BOS_ID, *ids], repr(text)
        assert hf.decode(ids) == ours_tok.decode(ids) == text, repr(text)


# --------------------------------------------------------------------------------------------
# 3b. The export as users run it: generation stops where a reply ends; the model card.


@pytest.fixture(scope="module")
def replying_run(trained, tmp_path_factory) -> tuple[str, list[int]]:
    """(checkpoint, its greedy chat reply: REPLY's tokens): the tiny model rewired so that greedy
    decoding replies REPLY, then <|im_end|>, then REPLY again, whatever the prompt. What a tiny
    model happens to reply is not under test (one machine's greedy reply held </s>), where
    generation stops is. The blocks add nothing (zero output projections), so the last token alone
    sets the logits: token CHAIN[i] embeds as the i-th unit vector and the head maps that to
    CHAIN[i + 1] alone (logit sqrt(d_model) after the final norm, 0 for every other token)."""
    import generate

    model, tokenizer_bytes = trained
    tok = tokenizer_from_bytes(tokenizer_bytes)
    prompt = generate.chat_prompt(tok, [{"role": "system", "content": DEFAULT_SYSTEM},
                                        {"role": "user", "content": QUESTION}])
    reply = tok.encode(REPLY)
    chain = [prompt[-1], *reply, IM_END_ID, reply[0]]  # the chat prompt ends the same way for HF
    assert len(set(chain[:-1])) == len(chain) - 1 and EOS_ID not in chain, chain
    rows, nexts = jnp.asarray(chain[:-1]), jnp.asarray(chain[1:])
    unit = jnp.eye(model.config.d_model)[:len(rows)]
    model = eqx.tree_at(lambda m: (m.embed, m.final_norm.weight, m.lm_head, m.blocks.attn.wo, m.blocks.mlp.w_down),
                        model, (model.embed.at[rows].set(unit), jnp.ones_like(model.final_norm.weight),
                                jnp.zeros_like(model.lm_head).at[jnp.arange(len(rows)), nexts].set(1.0),
                                jnp.zeros_like(model.blocks.attn.wo), jnp.zeros_like(model.blocks.mlp.w_down)))
    replied = generate.generate(model, [prompt], MAX_NEW, jax.random.key(0), temperature=0.0, stop_ids=())[0]
    assert replied[:len(reply) + 2] == [*reply, IM_END_ID, reply[0]], replied
    out = str(tmp_path_factory.mktemp("replying"))
    checkpoint.save(out, 0, model, tokenizer_bytes)
    return out, reply


QUESTION, REPLY, MAX_NEW = "Who is Holmes?", "A detective in London.", 24


def test_transformers_generate_on_the_chat_template_stops_at_im_end_with_generate_py_chats_reply(
        replying_run, tmp_path):
    import generate

    run, expected = replying_run
    hf_dir = str(tmp_path / "hf")
    model, tokenizer_bytes, _ = checkpoint.load(run)
    convert.export_hf(model, tokenizer_from_bytes(tokenizer_bytes), hf_dir)
    ours = run_script("generate.py", f"--checkpoint={run}", "--chat", "--temperature=0",
                      f"--max_new_tokens={MAX_NEW}", f"--prompt={QUESTION}").stdout
    ours = ours.split(generate.rule("assistant") + "\n", 1)[1][:-1]

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    chat = hf_tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
    start = chat["input_ids"].shape[1]
    with torch.no_grad():  # no eos_token_id given: generation_config.json's
        theirs = hf_model.generate(**chat, max_new_tokens=MAX_NEW, do_sample=False)[0, start:].tolist()
        past = hf_model.generate(**chat, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=EOS_ID,
                                 pad_token_id=PAD_ID)[0, start:].tolist()
    assert theirs == [*expected, IM_END_ID]
    assert ours == hf_tokenizer.decode(theirs, skip_special_tokens=True)
    assert ours == open_tokenizer(os.path.join(hf_dir, "tokenizer.model")).decode(expected)
    # Without the export's generation_config.json (stopping at </s> only) it runs past the reply.
    assert past[:len(theirs)] == theirs and len(past) > len(theirs)


def test_the_export_declares_its_stop_and_unknown_tokens(trained_hf_dir):
    generation = transformers.GenerationConfig.from_pretrained(trained_hf_dir)
    assert sorted(generation.eos_token_id) == [EOS_ID, IM_END_ID] == [3, 7]
    config = transformers.AutoConfig.from_pretrained(trained_hf_dir)
    assert (config.unk_token_id, config.bos_token_id, config.pad_token_id) == (UNK_ID, BOS_ID, PAD_ID) == (1, 2, 0)


def _front_matter(card: str) -> dict:
    import yaml

    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def test_the_model_card_names_languages_license_data_chat_format_and_evaluation(trained_hf_dir):
    with open(os.path.join(trained_hf_dir, "README.md"), encoding="utf-8") as f:
        card = f.read()
    front = _front_matter(card)
    assert front["language"] == ["en", "fr"] and front["license"] == "other"
    assert front["pipeline_tag"] == "text-generation" and front["model_name"] == "julian-3M"
    assert "model-index" not in front  # the shared run holds no lm-eval results
    assert "<|im_start|>user" in card and DEFAULT_SYSTEM in card and "`<|im_end|>`" in card
    assert "lm-evaluation-harness" in card and "No results were found" in card
    assert all(f"- `{f}`" in card for f in DATA_FILES)  # tiny_run trains on the samples
    # A base model's snippet continues text (it has not learnt to chat) within its 128-token context.
    assert "pretrained (base) model" in card and "apply_chat_template" not in card
    assert "max_new_tokens=32" in card


def test_a_fine_tuned_models_card_shows_a_chat_that_fits_its_context():
    config = ModelConfig(vocab_size=512, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=2048)
    card = convert.model_card(config, {"sft": {"train_data": "chat.jsonl"}}, 7, "other")
    assert "fine-tuned to chat" in card and "apply_chat_template" in card and "max_new_tokens=64" in card


def test_the_model_card_carries_the_runs_lm_eval_results_and_parses_as_a_hub_card(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    results = {"piqa": {"alias": "piqa", "sample_len": 40, "acc,none": 0.575, "acc_stderr,none": 0.079},
               "lambada_openai": {"sample_len": 40, "acc,none": 0.0, "perplexity,none": 9.1e7}}
    (run / "eval_results.json").write_text(json.dumps(results))
    step = checkpoint.latest_step(str(run))
    with open(run / "metrics.jsonl", "a") as f:  # a training record (its "a/b" keys are no scores)...
        for record in ({"step": step, "loss": 2.0, "rewards/accuracies": 0.9},
                       {"step": step - 1, "eval_loss": 9.0, "boolq/acc": 0.1},  # ...another step's...
                       {"step": step, "eval_loss": 5.5, "winogrande/acc": 0.55}):  # ...and this step's evaluation
            f.write(json.dumps(record) + "\n")
    out = tmp_path / "hf"
    run_script("convert.py", "--to=hf", f"--checkpoint={run}", f"--out={out}", "--license=apache-2.0")
    card = (out / "README.md").read_text(encoding="utf-8")
    front = _front_matter(card)
    assert front["license"] == "apache-2.0"
    scores = {(r["dataset"]["name"], m["type"]): m["value"] for entry in front["model-index"]
              for r in entry["results"] for m in r["metrics"]}
    assert scores == {("piqa", "acc"): 0.575, ("lambada_openai", "acc"): 0.0,
                      ("lambada_openai", "perplexity"): 9.1e7, ("winogrande", "acc"): 0.55}
    assert "| piqa | 40 | acc | 0.575 |" in card and "| winogrande |  | acc | 0.55 |" in card
    assert "| lambada_openai | 40 | perplexity | not predicted (> 1,000) |" in card
    assert "held-out data: loss 5.5." in card and f"step {step}." in card
    hub = pytest.importorskip("huggingface_hub")
    parsed = hub.ModelCard.load(str(out / "README.md"))
    assert parsed.data.language == ["en", "fr"] and parsed.data.license == "apache-2.0"
    assert {(e.dataset_name, e.metric_type): e.metric_value for e in parsed.data.eval_results} == scores


# --------------------------------------------------------------------------------------------
# 4. Round trips: import(export(x)) == x, in-process and through the CLI.


def test_import_of_an_export_gives_back_every_weight_exactly_and_the_config(random_model, random_hf_dir,
                                                                            tok):
    model, tokenizer, _ = hf_llama.import_hf(random_hf_dir)
    # The activation dtype is how a model runs, not what it is: the folder does not carry it.
    assert dataclasses.replace(model.config, dtype=random_model.config.dtype) == random_model.config
    model = _with_dtype(model, random_model.config.dtype)
    assert jax.tree.structure(model) == jax.tree.structure(random_model)
    _assert_same_leaves(model, random_model)
    assert tokenizer.model_bytes == tok.model_bytes


def test_cli_round_trip_through_hugging_face_gives_the_same_checkpoint(tiny_run, trained_hf_dir, tmp_path):
    original, tokenizer_bytes, original_config = checkpoint.load(tiny_run)
    out = str(tmp_path / "imported")
    run_script("convert.py", "--to=julian", f"--hf={trained_hf_dir}", f"--out={out}")
    imported, imported_bytes, imported_config = checkpoint.load(out)
    assert _architecture(imported.config) == _architecture(original.config)
    assert _architecture(ModelConfig(**imported_config["model"])) == _architecture(original.config)
    _assert_same_leaves(_with_dtype(imported, "float32"), _with_dtype(original, "float32"))
    assert imported_bytes == tokenizer_bytes


# --------------------------------------------------------------------------------------------
# 5. A Llama written by Hugging Face, with tied embeddings, imports and computes its logits.


def test_import_of_a_tied_embedding_hf_llama_gives_its_logits(tok, tiny_tokenizer_path, tmp_path):
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5,
        rope_theta=20_000.0, tie_word_embeddings=True)
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():  # a trained model's scale, and norms that are not all ones
        for name, p in hf_model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    assert hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()
    hf_dir = str(tmp_path / "tied")
    hf_model.save_pretrained(hf_dir, safe_serialization=True)
    shutil.copy(tiny_tokenizer_path, os.path.join(hf_dir, "tokenizer.model"))
    saved = safetensors_np.load_file(os.path.join(hf_dir, "model.safetensors"))
    assert "lm_head.weight" not in saved  # so the import must tie the head itself

    model, tokenizer, _ = hf_llama.import_hf(hf_dir)
    assert (model.config.rope_theta, model.config.norm_eps, model.config.d_model) == (20_000.0, 1e-5, 64)
    assert model.config.tie_embeddings and model.lm_head is None  # the head is the embedding itself
    assert tokenizer.model_bytes == tok.model_bytes
    tokens = np.random.default_rng(5).integers(0, tok.vocab_size, (2, 33))
    np.testing.assert_allclose(_logits(_with_dtype(model, "float32"), tokens), _hf_logits(hf_model, tokens),
                               rtol=0, atol=ATOL)


# --------------------------------------------------------------------------------------------
# 6. Bad input is refused with a message that names what is wrong.


def test_import_of_a_folder_without_config_json_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "config.json"))):
        hf_llama.import_hf(str(tmp_path))


@pytest.mark.parametrize("edit, named", [
    pytest.param({"model_type": "mistral", "sliding_window": 4096}, "sliding_window=4096 (sliding-window attention)",
                 id="mistral-sliding-window"),
    pytest.param({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "num_local_experts": 8},
                 "num_local_experts=8 (a mixture of experts)", id="moe"),
    pytest.param({"attention_bias": True}, "attention_bias=true", id="attention-bias"),
    pytest.param({"mlp_bias": True}, "mlp_bias=true", id="mlp-bias"),
    pytest.param({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, "model_type='qwen2'", id="qwen2"),
    pytest.param({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_type='yarn'",
                 id="yarn-rope"),
    pytest.param({"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type='linear'",
                 id="old-linear-rope"),
    pytest.param({"head_dim": 128}, "head_dim=128", id="head-dim"),
])
def test_import_of_an_architecture_we_do_not_run_is_refused_in_one_line_naming_it(random_hf_dir, tmp_path,
                                                                                  edit, named):
    with open(os.path.join(random_hf_dir, "config.json")) as f:
        config = json.load(f)
    with open(tmp_path / "config.json", "w") as f:
        json.dump({**config, **edit}, f)
    with pytest.raises(ValueError) as raised:
        hf_llama.import_hf(str(tmp_path))
    message = str(raised.value)
    assert named in message and "supported: a Llama" in message and "\n" not in message


def test_both_rope_spellings_are_read_theta_and_llama3_scaling():
    llama3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    base = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=1)
    new = hf_llama.model_config_from_hf({**base, "rope_parameters": {**llama3, "rope_theta": 5e5}}, "new")
    old = hf_llama.model_config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": llama3}, "old")
    assert new == old
    assert (new.rope_theta, new.rope_scaling, new.kv_heads) == (5e5, (32.0, 1.0, 4.0, 8192), 1)


def _corrupted_copy(hf_dir: str, tmp_path, edit) -> str:
    out = str(tmp_path / "corrupted")
    shutil.copytree(hf_dir, out)
    path = os.path.join(out, "model.safetensors")
    tensors = safetensors_np.load_file(path)
    edit(tensors)
    safetensors_np.save_file(tensors, path, metadata={"format": "pt"})
    return out


def _transpose(name):
    def edit(tensors):
        tensors[name] = np.ascontiguousarray(tensors[name].T)
    return edit


def _drop_row(name):
    def edit(tensors):
        tensors[name] = np.ascontiguousarray(tensors[name][:-1])
    return edit


@pytest.mark.parametrize("name, edit", [
    pytest.param("model.layers.1.mlp.up_proj.weight", _transpose, id="one-layer-transposed"),
    pytest.param("model.embed_tokens.weight", _drop_row, id="embedding-smaller-than-vocab"),
    pytest.param("model.norm.weight", _drop_row, id="final-norm"),
])
def test_import_of_a_tensor_with_a_wrong_shape_is_refused_naming_the_tensor(random_hf_dir, tmp_path,
                                                                           name, edit):
    bad = _corrupted_copy(random_hf_dir, tmp_path, edit(name))
    with pytest.raises(ValueError, match=re.escape(name)):
        hf_llama.import_hf(bad)


def test_import_of_a_folder_missing_a_tensor_names_it(random_hf_dir, tmp_path):
    name = "model.layers.1.self_attn.k_proj.weight"
    bad = _corrupted_copy(random_hf_dir, tmp_path, lambda tensors: tensors.pop(name))
    with pytest.raises(ValueError, match=re.escape(name)):
        hf_llama.import_hf(bad)


def test_cli_export_of_a_directory_without_a_checkpoint_fails_naming_it(tmp_path):
    empty = tmp_path / "no_checkpoint_here"
    empty.mkdir()
    out = tmp_path / "hf"
    result = forked.run([sys.executable, os.path.join(REPO, "convert.py"), "--to=hf",
                         f"--checkpoint={empty}", f"--out={out}"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert str(empty) in result.stdout + result.stderr
    assert not os.path.exists(out / "model.safetensors")


# --------------------------------------------------------------------------------------------
# 7. A Llama-family folder (grouped-query attention, tied embeddings, Llama 3 rope, sharded
# safetensors) imports, computes transformers' logits, and goes back byte for byte.


def _gqa_hf_folder(out: str, vocab_size: int, bos_id: int, eos_id: int) -> str:
    """A random GQA (4/2 heads), tied, Llama 3 rope-scaled transformers Llama saved in shards,
    with a generation config of its own."""
    torch.manual_seed(1)
    hf_config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
        tie_word_embeddings=True, rope_theta=500_000.0, bos_token_id=bos_id, eos_token_id=eos_id,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            p.copy_(1.0 + 0.5 * torch.randn_like(p) if p.ndim == 1 else torch.randn_like(p) / p.shape[-1] ** 0.5)
    hf_model.save_pretrained(out, safe_serialization=True, max_shard_size="100KB")
    transformers.GenerationConfig(bos_token_id=bos_id, eos_token_id=[eos_id, IM_END_ID], temperature=0.3,
                                  do_sample=True).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def gqa_hf_dir(tok, tmp_path_factory) -> str:
    out = _gqa_hf_folder(str(tmp_path_factory.mktemp("hf_gqa")), tok.vocab_size, BOS_ID, EOS_ID)
    # The tokenizer files as our export writes them: a SentencePiece model with its chat template.
    convert.save_hf_tokenizer(tok, out, convert.CHAT_TEMPLATE)
    return out


@pytest.fixture(scope="module")
def llama3_hf_dir(llama3_tokenizer_dir, tmp_path_factory) -> str:
    """The same with a Llama 3-style tokenizer: byte-level BPE tokenizer.json, its config, and a
    chat template in chat_template.jinja."""
    out = str(tmp_path_factory.mktemp("hf_llama3"))
    for name in os.listdir(llama3_tokenizer_dir):
        shutil.copy(os.path.join(llama3_tokenizer_dir, name), out)
    return _gqa_hf_folder(out, 1000, 0, 1)


def test_a_sharded_gqa_tied_llama3_folder_imports_and_gives_transformers_logits(gqa_hf_dir, tok):
    assert os.path.exists(os.path.join(gqa_hf_dir, "model.safetensors.index.json"))
    model, tokenizer, imported = hf_llama.import_hf(gqa_hf_dir)
    c = model.config
    assert (c.n_heads, c.kv_heads, c.tie_embeddings, c.rope_scaling) == (4, 2, True, (8.0, 1.0, 4.0, 16))
    assert imported["generation_config"]["temperature"] == 0.3
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(gqa_hf_dir, dtype=torch.float32).eval()
    tokens = np.random.default_rng(7).integers(0, tok.vocab_size, (2, 48))
    want = _hf_logits(hf_model, tokens)
    np.testing.assert_allclose(_logits(_with_dtype(model, "float32"), tokens), want, rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())


def _files(directory: str) -> dict[str, bytes]:
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))}


@pytest.mark.parametrize("folder", ["gqa_hf_dir", "llama3_hf_dir"])
def test_cli_round_trip_hf_julian_hf_gives_identical_tensors_tokenizer_and_generation_config(folder, request,
                                                                                            tmp_path):
    gqa_hf_dir = request.getfixturevalue(folder)
    run_script("convert.py", "--to=julian", f"--hf={gqa_hf_dir}", f"--out={tmp_path / 'imported'}")
    run_script("convert.py", "--to=hf", f"--checkpoint={tmp_path / 'imported'}", f"--out={tmp_path / 'back'}")
    back = str(tmp_path / "back")
    original = {}
    for name in _files(gqa_hf_dir):
        if name.endswith(".safetensors"):
            original.update(safetensors_np.load_file(os.path.join(gqa_hf_dir, name)))
    exported = safetensors_np.load_file(os.path.join(back, "model.safetensors"))
    assert sorted(exported) == sorted(original)  # tied: no lm_head.weight on either side
    for name, value in original.items():
        assert np.array_equal(exported[name], value), name
    before, after = _files(gqa_hf_dir), _files(back)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json",
                 "chat_template.jinja"):
        assert before.get(name) == after.get(name), name
    assert ("tokenizer.json" in after) == (folder == "llama3_hf_dir")
    assert json.loads(after["generation_config.json"]) == json.loads(before["generation_config.json"])
    config, hf_config = json.loads(after["config.json"]), json.loads(before["config.json"])
    for key in ("num_key_value_heads", "tie_word_embeddings", "rope_parameters", "bos_token_id", "eos_token_id"):
        assert config[key] == hf_config[key], key
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32).eval()
    assert hf_model.config.num_key_value_heads == 2 and hf_model.config.tie_word_embeddings


def test_a_hugging_face_folder_loads_wherever_a_checkpoint_does_and_says_it_imports_it(gqa_hf_dir, capsys):
    model, tokenizer_bytes, config = checkpoint.load(gqa_hf_dir, model_overrides={"dtype": "float32"})
    assert "imported Hugging Face folder" in capsys.readouterr().err
    reference, tokenizer, _ = hf_llama.import_hf(gqa_hf_dir)
    _assert_same_leaves(model, _with_dtype(reference, "float32"))
    assert tokenizer_bytes == tokenizer.model_bytes
    assert config["model"]["n_kv_heads"] == 2 and checkpoint.imported_of(config)["config"]["model_type"] == "llama"
    saved, saved_bytes = checkpoint.load_config(gqa_hf_dir)
    assert {**saved["model"], "dtype": "float32"} == config["model"] and saved_bytes == tokenizer_bytes


@pytest.mark.slow
def test_continued_pretraining_from_a_hugging_face_folder_takes_its_shape_and_tokenizer_and_exports_back(
        gqa_hf_dir, tmp_path):
    """train.py --init_from=HF folder with no model flags and no --tokenizer: the folder's shape
    and tokenizer, a fresh optimizer with its own warmup; the export is still a GQA tied Llama 3
    with the folder's generation config. A model flag that disagrees is refused naming it."""
    run = str(tmp_path / "continued")
    common = [f"--init_from={gqa_hf_dir}", f"--train_data={DATA_FILES[0]}", "--seq_len=32",
              "--steps=2", "--warmup_steps=1", "--batch_size=2", "--log_every=1", "--checkpoint_every=2",
              "--dtype=float32", "--scan_layers=false", "--eval_every=0"]
    result = forked.run([sys.executable, os.path.join(REPO, "train.py"), *common, "--n_kv_heads=4",
                         f"--output_dir={tmp_path / 'refused'}"], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
    assert result.returncode != 0 and "--n_kv_heads: the checkpoint has 2, the flags say 4" in result.stderr
    result = run_script("train.py", *common, f"--output_dir={run}")
    assert "imported Hugging Face folder" in result.stderr and f"parameters from {gqa_hf_dir}" in result.stdout + result.stderr
    model, _, config = checkpoint.load(run)
    assert (model.config.kv_heads, model.config.tie_embeddings, model.config.rope_scaling) == (2, True, (8.0, 1.0, 4.0, 16))
    back = str(tmp_path / "back")
    run_script("convert.py", "--to=hf", f"--checkpoint={run}", f"--out={back}")
    with open(os.path.join(back, "generation_config.json")) as f:
        assert json.load(f)["temperature"] == 0.3
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32).eval()
    tokens = np.random.default_rng(8).integers(0, 4096, (1, 20))
    want = _hf_logits(hf_model, tokens)
    np.testing.assert_allclose(_logits(_with_dtype(model, "float32"), tokens), want, rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())
