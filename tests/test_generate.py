"""generate.py: the sampling rules, KV-cache decoding, stop strings, streaming and chat.

References: greedy decoding by full recomputation (one causal forward pass over prompt + output
gives every step's prediction), and Hugging Face's `generate` on the exported tiny model.
"""

import os
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoint
import generate as G
import forked
from conftest import REPO
from generate import generate, sample_logits
from model import ModelConfig, Transformer
from tokenizer import BOS_ID, EOS_ID, IM_END_ID
from tokenizer_files import open_tokenizer, tokenizer_from_bytes

full_forward = eqx.filter_jit(lambda model, tokens: model(tokens))

LOGITS = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))


def _frequencies(temperature=1.0, top_k=0, top_p=1.0, n=4000):
    keys = jax.random.split(jax.random.key(0), n)
    draws = jax.vmap(lambda k: sample_logits(LOGITS, k, temperature, top_k, top_p))(keys)
    return np.stack([np.bincount(draws[:, row], minlength=4) / n for row in range(2)])


def test_temperature_zero_is_greedy():
    np.testing.assert_array_equal(sample_logits(LOGITS, jax.random.key(0), 0.0), [0, 3])


def test_temperature_one_samples_the_softmax():
    np.testing.assert_allclose(_frequencies(), np.exp(LOGITS), atol=0.03)


def test_top_k_keeps_only_the_k_most_likely_tokens_renormalized():
    freq = _frequencies(top_k=2)
    np.testing.assert_allclose(freq[0], [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.03)
    np.testing.assert_allclose(freq[1], [0, 0, 0.3 / 0.8, 0.5 / 0.8], atol=0.03)


def test_top_p_keeps_the_smallest_set_reaching_p():
    # 0.5 + 0.3 = 0.8 >= 0.7: two tokens; the third would only be needed beyond 0.8.
    freq = _frequencies(top_p=0.7)
    np.testing.assert_allclose(freq[0], [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.03)
    assert (_frequencies(top_p=0.81)[0] > 0).sum() == 3


def test_greedy_generation_continues_each_prompt_as_the_model_predicts():
    config = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=2, d_ff=128, max_seq_len=32,
                         dtype="float32")
    model = Transformer(config, jax.random.key(0))
    prompts = [[2, 10, 11, 12], [2, 20]]
    n = 2 * G.CHUNK + 3  # the prefill, then decoding loops that run across two chunk boundaries
    out = generate(model, prompts, n, jax.random.key(1), temperature=0.0, stop_ids=())
    for prompt, new in zip(prompts, out):
        assert len(new) == n
        # Each generated token is the argmax of the model run on everything before it (one
        # causal forward pass over the whole sequence gives all those predictions at once).
        logits = full_forward(model, jnp.array([prompt + new]))[0]
        predicted = jnp.argmax(logits[len(prompt) - 1 : -1], axis=-1)
        np.testing.assert_array_equal(predicted, new)


def test_each_model_decodes_with_its_own_weights_when_models_alternate():
    # generate.py keeps the per-layer copy of the weights of the model it sampled from last.
    config = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=2, d_ff=128, max_seq_len=32,
                         dtype="float32")
    models = [Transformer(config, jax.random.key(seed)) for seed in (1, 2, 1)]
    prompt = [2, 10, 11]
    outs = [generate(model, [prompt], 6, jax.random.key(0), temperature=0.0, stop_ids=())[0] for model in models]
    for model, new in zip(models, outs):
        logits = full_forward(model, jnp.array([prompt + new]))[0]
        np.testing.assert_array_equal(np.argmax(logits[len(prompt) - 1: -1], axis=-1), new)
    assert outs[0] == outs[2] != outs[1]


def test_generation_stops_at_a_stop_id():
    config = ModelConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=2, d_ff=128, max_seq_len=32,
                         dtype="float32")
    model = Transformer(config, jax.random.key(0))
    first = generate(model, [[2, 5]], 4, jax.random.key(1), temperature=0.0, stop_ids=())[0]
    assert generate(model, [[2, 5]], 4, jax.random.key(1), temperature=0.0, stop_ids=(first[0],)) == [[]]
    stop_later = next(t for t in first if t != first[0])
    stopped = generate(model, [[2, 5]], 4, jax.random.key(1), temperature=0.0, stop_ids=(stop_later,))[0]
    assert stopped == first[: first.index(stop_later)]


# ---------------------------------------------------------------------------------------------
# On the trained tiny model.

PROMPTS = ["Sherlock Holmes", "Il était une fois, dans un petit village de Normandie, un", "The"]


@pytest.fixture(scope="module")
def tiny(tiny_run):
    model, tokenizer_bytes, _ = checkpoint.load(tiny_run, model_overrides={"dtype": "float32"})
    return model, tokenizer_from_bytes(tokenizer_bytes)


def test_kv_cache_greedy_decoding_equals_greedy_by_full_recomputation(tiny):
    model, tokenizer = tiny
    prompts = [[BOS_ID, *tokenizer.encode(p)] for p in PROMPTS]  # different lengths: right-padded
    out = generate(model, prompts, 20, jax.random.key(0), temperature=0.0, stop_ids=())
    for prompt, new in zip(prompts, out):
        assert len(new) == 20
        logits = full_forward(model, jnp.array([prompt + new]))[0]
        np.testing.assert_array_equal(np.argmax(logits[len(prompt) - 1: -1], axis=-1), new)


def test_each_prompt_of_a_batch_gets_what_it_gets_alone(tiny):
    model, tokenizer = tiny
    prompts = [[BOS_ID, *tokenizer.encode(p)] for p in PROMPTS]
    batch = generate(model, prompts, 12, jax.random.key(0), temperature=0.0)
    assert batch == [generate(model, [p], 12, jax.random.key(0), temperature=0.0)[0] for p in prompts]


def test_stop_strings_cut_the_text_and_streaming_shows_exactly_the_returned_text(tiny):
    model, tokenizer = tiny
    prompt = [[BOS_ID, *tokenizer.encode("Sherlock Holmes")]]
    full = G.complete(model, tokenizer, prompt, 40, jax.random.key(0), stop_ids=())[0]
    stop = next(c for c in (" the", "e", " ") if c in full[1:])  # a string the greedy text contains
    pieces = []
    cut = G.complete(model, tokenizer, prompt, 40, jax.random.key(0), stop_ids=(), stop_strings=[stop],
                     on_text=lambda row, piece: pieces.append(piece))[0]
    assert cut == full[: full.index(stop)]
    assert "".join(pieces) == cut


def test_a_prompt_that_leaves_no_room_is_refused_with_the_lengths(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match=r"prompt \(100 tokens\) \+ max_new_tokens \(64\) exceeds"):
        generate(model, [[BOS_ID] * 100], 64, jax.random.key(0))


def test_chat_renders_chatml_and_replies_as_hugging_face_generate_does(tiny, tiny_hf):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, tokenizer = tiny
    messages = [{"role": "system", "content": G.DEFAULT_SYSTEM}, {"role": "user", "content": "Who is Holmes?"}]
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_hf)
    template = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=False)
    assert G.chat_prompt(tokenizer, messages) == template  # the export's template adds the <s>
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32)
    with torch.no_grad():
        hf_ids = hf_model.generate(torch.tensor([template]), max_new_tokens=16, do_sample=False,
                                   eos_token_id=[EOS_ID, IM_END_ID], pad_token_id=0)[0, len(template):]
    pieces = []
    reply = G.chat(model, tokenizer, messages, max_new_tokens=16, on_text=pieces.append)
    assert reply == tokenizer.decode([t for t in hf_ids.tolist() if t not in (EOS_ID, IM_END_ID)])
    assert "".join(pieces) == reply


# ---------------------------------------------------------------------------------------------
# The command line.


def _run(*args, stdin=None):
    return forked.run([sys.executable, "generate.py", *args], cwd=REPO, capture_output=True, text=True,
                      input=stdin, timeout=300)


def test_the_chat_command_line_prints_the_question_above_the_streamed_reply(tiny_run, tiny):
    model, tokenizer = tiny
    result = _run(f"--checkpoint={tiny_run}", "--prompt=Sherlock Holmes", "--temperature=0",
                  "--max_new_tokens=10", "--chat", "--system=")
    assert result.returncode == 0, result.stderr
    messages = [{"role": "user", "content": "Sherlock Holmes"}]
    reply = G.chat(model, tokenizer, messages, max_new_tokens=10)
    assert result.stdout == f"{G.rule('user')}\nSherlock Holmes\n{G.rule('assistant')}\n{reply}\n"


def test_samples_print_each_prompt_above_its_own_continuation(tiny_run, tiny):
    model, tokenizer = tiny
    prompts = ["Sherlock Holmes", "Il était une fois"]
    result = _run(f"--checkpoint={tiny_run}", *(f"--prompt={p}" for p in prompts), "--temperature=0",
                  "--max_new_tokens=8")
    assert result.returncode == 0, result.stderr
    texts = G.complete(model, tokenizer, [[BOS_ID, *tokenizer.encode(p)] for p in prompts], 8, jax.random.key(0))
    assert all(texts)
    assert result.stdout == "".join(
        f"{G.rule(f'prompt {i + 1} of 2')}\n{prompt}\n{G.rule('continuation')}\n{text}\n\n"
        for i, (prompt, text) in enumerate(zip(prompts, texts)))


def test_chat_without_a_prompt_holds_a_conversation_on_stdin(tiny_run):
    result = _run(f"--checkpoint={tiny_run}", "--chat", "--temperature=0", "--max_new_tokens=6",
                  stdin="Hello there\n/reset\nBonjour\n\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("> ") == 4  # three turns read, then the empty line that ends it


def test_the_command_line_names_what_is_missing(tmp_path):
    result = _run(f"--checkpoint={tmp_path / 'nothing'}", "--prompt=x")
    assert result.returncode != 0 and "no checkpoint in" in result.stderr and "Traceback" not in result.stderr
    result = _run(f"--checkpoint={tmp_path}")
    assert result.returncode != 0 and "--prompt is required" in result.stderr


# ---------------------------------------------------------------------------------------------
# The persistent compilation cache.


def _cache_entries(directory):
    return {p.name for p in directory.iterdir()} if directory.exists() else set()


def _compile_log(*args, env_cache):
    # JAX logs each persistent-cache hit and miss at WARNING with these two switches.
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(env_cache), JAX_LOG_COMPILES="1",
               JAX_EXPLAIN_CACHE_MISSES="1")
    result = forked.run([sys.executable, "generate.py", *args], cwd=REPO, capture_output=True, text=True,
                        env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


@pytest.mark.slow
def test_a_second_generate_process_loads_its_programs_from_the_cache_the_flag_names(tiny_run, tmp_path):
    flag_cache, env_cache = tmp_path / "flag", tmp_path / "env"
    args = (f"--checkpoint={tiny_run}", "--prompt=Sherlock", "--temperature=0", "--max_new_tokens=8")
    first = _compile_log(*args, f"--compilation_cache_dir={flag_cache}", env_cache=env_cache)
    written = _cache_entries(flag_cache)
    assert "PERSISTENT COMPILATION CACHE MISS" in first and written
    assert not _cache_entries(env_cache)  # the flag wins over $JAX_COMPILATION_CACHE_DIR
    second = _compile_log(*args, f"--compilation_cache_dir={flag_cache}", env_cache=env_cache)
    assert "PERSISTENT COMPILATION CACHE MISS" not in second
    assert second.count("Persistent compilation cache hit") >= 2  # at least the prefill and the decoding
    assert _cache_entries(flag_cache) == written
    off = _compile_log(*args, "--compilation_cache_dir=", env_cache=env_cache)
    assert "Persistent compilation cache hit" not in off and not _cache_entries(env_cache)


def test_an_empty_reply_is_named_as_one_and_a_reply_is_printed_as_it_is():
    assert G.empty_note("Bonjour", chat=True) == ""
    assert G.empty_note("", chat=True) == "(empty reply: the model ended its turn at once)"
    assert "ended the text at once" in G.empty_note("", chat=False)


def test_chat_with_a_llama3_template_stops_at_its_eot_token_not_at_eos(llama3_tokenizer_dir, tmp_path):
    """A model built to answer two tokens then <|eot_id|> then more: with the blocks zeroed, the
    hidden state of a token is its embedding, so each token's embedding (a basis vector) and the
    output matrix make a fixed chain: the prompt's last token -> A -> B -> <|eot_id|> -> C."""
    transformers = pytest.importorskip("transformers")
    tokenizer = open_tokenizer(llama3_tokenizer_dir)
    messages = [{"role": "system", "content": "Sois bref."}, {"role": "user", "content": "Bonjour"}]
    prompt = G.chat_prompt(tokenizer, messages)
    hf = transformers.AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    assert prompt == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
    eot, eos = hf.convert_tokens_to_ids("<|eot_id|>"), hf.eos_token_id
    assert eot != eos and tokenizer.chat_stop_ids == (eos, eot)
    a, b, c = (tokenizer.encode(word)[0] for word in (" Holmes", " Watson", " Paris"))
    chain = [prompt[-1], a, b, eot, c]
    assert len(set(chain)) == len(chain)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                         max_seq_len=128, dtype="float32")
    model = Transformer(config, jax.random.key(0))
    model = eqx.tree_at(lambda m: m.blocks, model, jax.tree.map(lambda x: jnp.zeros_like(x) if eqx.is_array(x) else x,
                                                                model.blocks))
    basis = jnp.eye(config.d_model)
    embed, head = jnp.zeros_like(model.embed), jnp.zeros_like(model.lm_head)
    for k, (token, following) in enumerate(zip(chain, chain[1:])):
        embed, head = embed.at[token].set(basis[k]), head.at[:, following].set(10 * basis[k])
    model = eqx.tree_at(lambda m: (m.embed, m.lm_head), model, (embed, head))
    assert generate(model, [prompt], 4, jax.random.key(0), temperature=0.0, stop_ids=(eos,)) == [[a, b, eot, c]]
    directory = str(tmp_path / "forced")
    checkpoint.save(directory, 0, model, tokenizer.model_bytes)
    result = _run(f"--checkpoint={directory}", "--chat", "--prompt=Bonjour", "--system=Sois bref.",
                  "--temperature=0", "--max_new_tokens=8")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{G.rule('user')}\nBonjour\n{G.rule('assistant')}\n{tokenizer.decode([a, b])}\n"
    # An imported model's generation_config.json may name more ends (transformers stops there too).
    imported = str(tmp_path / "imported")
    checkpoint.save(imported, 0, model, tokenizer.model_bytes,
                    {checkpoint.IMPORTED: {"generation_config": {"eos_token_id": [eos, b]}}})
    result = _run(f"--checkpoint={imported}", "--chat", "--prompt=Bonjour", "--system=Sois bref.",
                  "--temperature=0", "--max_new_tokens=8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(f"{G.rule('assistant')}\n{tokenizer.decode([a])}\n")


def test_an_imported_llama3_style_model_chats_as_transformers_generate_and_exports_its_tokenizer_back(
        llama3_tokenizer_dir, tmp_path):
    """A random GQA Llama with the Llama-3-style tokenizer (conftest), imported by convert.py: the
    greedy chat reply is transformers' (prompt by its template, stop at <|eot_id|> or eos), and the
    export writes the tokenizer's files back byte for byte."""
    import shutil

    import convert
    import hf_llama

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    stops = [hf_tokenizer.eos_token_id, hf_tokenizer.convert_tokens_to_ids("<|eot_id|>")]
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(hf_tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, tie_word_embeddings=True,
                                      bos_token_id=hf_tokenizer.bos_token_id, eos_token_id=stops)
    hf_model = transformers.LlamaForCausalLM(config).eval()
    folder = str(tmp_path / "hf")
    hf_model.save_pretrained(folder)
    for name in os.listdir(llama3_tokenizer_dir):
        shutil.copy(os.path.join(llama3_tokenizer_dir, name), folder)
    model, tokenizer, imported = hf_llama.import_hf(folder, overrides={"dtype": "float32"})
    messages = [{"role": "system", "content": "Sois bref."}, {"role": "user", "content": "Qui est Holmes ?"}]
    prompt = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"]
    assert G.chat_prompt(tokenizer, messages) == prompt
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=stops,
                                   pad_token_id=stops[0])[0, len(prompt):].tolist()
    reply = G.chat(model, tokenizer, messages, max_new_tokens=12)
    assert len([t for t in theirs if t not in stops]) >= 4  # a reply of several tokens, not an immediate stop
    assert reply == tokenizer.decode([t for t in theirs if t not in stops])
    convert.export_hf(model, tokenizer, str(tmp_path / "back"), imported=imported)
    for name in os.listdir(llama3_tokenizer_dir):
        with open(os.path.join(llama3_tokenizer_dir, name), "rb") as a, open(tmp_path / "back" / name, "rb") as b:
            assert a.read() == b.read(), name
