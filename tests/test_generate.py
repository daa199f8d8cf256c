"""generate.py: the sampling rules and the simple sampler."""

import jax
import jax.numpy as jnp
import numpy as np

from generate import generate, sample_logits
from model import ModelConfig, Transformer

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
    out = generate(model, prompts, 6, jax.random.key(1), temperature=0.0, stop_ids=())
    for prompt, new in zip(prompts, out):
        assert len(new) == 6
        # Each generated token is the argmax of the model run on everything before it (one
        # causal forward pass over the whole sequence gives all those predictions at once).
        logits = model(jnp.array([prompt + new]))[0]
        predicted = jnp.argmax(logits[len(prompt) - 1 : -1], axis=-1)
        np.testing.assert_array_equal(predicted, new)


def test_generation_stops_at_a_stop_id():
    config = ModelConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=2, d_ff=128, max_seq_len=32,
                         dtype="float32")
    model = Transformer(config, jax.random.key(0))
    first = generate(model, [[2, 5]], 4, jax.random.key(1), temperature=0.0, stop_ids=())[0]
    assert generate(model, [[2, 5]], 4, jax.random.key(1), temperature=0.0, stop_ids=(first[0],)) == [[]]
    stop_later = next(t for t in first if t != first[0])
    stopped = generate(model, [[2, 5]], 4, jax.random.key(1), temperature=0.0, stop_ids=(stop_later,))[0]
    assert stopped == first[: first.index(stop_later)]
