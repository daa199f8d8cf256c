"""dpo.py: the numbers against TRL's DPOTrainer itself, a preference learnt, formats, bad input."""

import dataclasses
import functools
import json
import os
import re
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import budget
import chat_formats
import checkpoint
import convert
import dpo
import hf_llama
import optim
import pair_packing
import parallel
import prepared
import train
import train_step
import forked
from conftest import REPO, run_script
from model import ModelConfig, Transformer, num_params
from tokenizer import BOS_ID, DEFAULT_SYSTEM, IM_END_ID, Tokenizer
from tokenizer_files import open_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

PAIRS = os.path.join(REPO, "samples", "preference", "en_hh_rlhf_sample100_pairs.jsonl")
MAX_LENGTH = 128  # the tiny model's context
TOL = 1e-4


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_path) -> Tokenizer:
    return open_tokenizer(tiny_tokenizer_path)


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)) + "\n")
    return str(path)


# --------------------------------------------------------------------------------------------
# Parity with TRL: the tiny run as reference, a perturbed copy as policy, both exported.


@pytest.fixture(scope="module")
def models(tiny_run):
    reference, _, _ = checkpoint.load(tiny_run, model_overrides={"dtype": "float32"})
    leaves, treedef = jax.tree.flatten(reference)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    noisy = [x + 0.02 * jnp.std(x) * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, noisy), reference


@pytest.fixture(scope="module")
def real_pairs(tokenizer):
    """The first sample pairs that fit the tiny context whole (TRL would cut differently)."""
    pairs, _ = chat_formats.load_pairs(PAIRS)
    fitting = [(p, r) for p in pairs for r, status in [pair_packing.render_pair(tokenizer, p, MAX_LENGTH, 96)]
               if status == "ok"]
    return fitting[:6]


@pytest.fixture(scope="module")
def trl_setup(models, real_pairs, tokenizer, tmp_path_factory):
    """make_trainer(loss, output_dir, **optimizer): TRL's DPOTrainer on the exported policy and
    reference, over the real pairs in TRL's conversational form."""
    policy, reference = models
    dirs = {}
    for name, model in (("policy", policy), ("reference", reference)):
        dirs[name] = str(tmp_path_factory.mktemp(f"hf_{name}"))
        convert.export_hf(model, tokenizer, dirs[name])
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(dirs["policy"])
    # TRL's conversational form; the default system message is left to the exported template.
    records = [{"prompt": list(p.prompt[1:]), "chosen": [{"role": "assistant", "content": p.chosen}],
                "rejected": [{"role": "assistant", "content": p.rejected}]} for p, _ in real_pairs]

    def make_trainer(loss: str, out: str, **optimizer):
        load = lambda d: transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        config = trl.DPOConfig(output_dir=out, loss_type=[loss], beta=0.1, max_length=None, bf16=False,
                               use_cpu=True, report_to=[], per_device_train_batch_size=len(records),
                               save_strategy="no", logging_steps=1, dataloader_num_workers=0, seed=0,
                               **optimizer)
        return trl.DPOTrainer(model=load(dirs["policy"]), ref_model=load(dirs["reference"]), args=config,
                              train_dataset=datasets.Dataset.from_list(records), processing_class=hf_tokenizer)

    return make_trainer


def _our_batch(real_pairs, reference):
    rows = pair_packing.to_rows([r for _, r in real_pairs], MAX_LENGTH)
    batch = pair_packing.pair_arrays(rows, np.arange(rows.num_rows), None)
    batch["reference_logps"] = np.asarray(dpo.sequence_logps(reference, batch["tokens"], batch["weights"]))
    return rows, {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_token_ids_logps_loss_and_reward_metrics_equal_trl(loss, models, real_pairs, trl_setup, tmp_path):
    policy, reference = models
    trainer = trl_setup(loss, str(tmp_path))
    # 1. Token ids: TRL's tokenization of the exported template = our rendering, prompt and replies.
    rows, batch = _our_batch(real_pairs, reference)
    for i, example in enumerate(trainer.train_dataset):
        for k, side in enumerate(("chosen_ids", "rejected_ids")):
            ours = rows.tokens[i, k][: len(example["prompt_ids"]) + len(example[side])]
            assert example["prompt_ids"] + example[side] == ours.tolist()
            assert rows.reply[i, k].sum() == len(example[side])  # TRL's completion = our reply
            assert example[side][-1] == IM_END_ID and example["prompt_ids"][0] == BOS_ID
    # 2. Per-pair log-probabilities of policy and reference.
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(real_pairs))])
    theirs_ref = torch.stack(trainer.compute_ref_log_probs(trainer.ref_model, trl_batch), 1).numpy()
    theirs_policy = torch.stack(trainer.compute_ref_log_probs(trainer.model, trl_batch), 1).numpy()
    ours_policy = np.asarray(dpo.sequence_logps(policy, batch["tokens"], batch["weights"]))
    np.testing.assert_allclose(np.asarray(batch["reference_logps"]), theirs_ref, atol=TOL, rtol=1e-6)
    np.testing.assert_allclose(ours_policy, theirs_policy, atol=TOL, rtol=1e-6)
    assert np.abs(ours_policy - theirs_ref).max() > 0.05  # policy and reference do differ
    # 3. Loss and TRL's reward metrics, through our train_step.LossFn.
    trainer.model.train()
    with torch.no_grad():
        their_loss = float(trainer.compute_loss(trainer.model, trl_batch))
    their_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k in dpo.METRICS}
    summed, count, sums = dpo.make_loss_fn(dpo.LossConfig(loss, 0.1))(policy, batch, None)
    assert float(summed / count) == pytest.approx(their_loss, abs=TOL)
    assert set(their_metrics) == set(dpo.METRICS)
    for name, value in their_metrics.items():
        assert float(sums[name] / count) == pytest.approx(value, abs=TOL), name


def test_conservative_dpo_is_trl_sigmoid_on_the_pairs_and_on_the_swapped_pairs(models, real_pairs, trl_setup,
                                                                               tmp_path):
    """--label_smoothing e: (1 - e) x TRL's loss on the pairs + e x TRL's loss with chosen and
    rejected swapped (TRL 1.16's sigmoid loss has no smoothing of its own)."""
    policy, reference = models
    trainer = trl_setup("sigmoid", str(tmp_path))
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(real_pairs))])
    n = len(real_pairs)
    swap = lambda t: torch.cat([t[n:], t[:n]])
    swapped = {k: swap(v) for k, v in trl_batch.items()}
    with torch.no_grad():
        straight, flipped = (float(trainer.compute_loss(trainer.model, b)) for b in (trl_batch, swapped))
    _, batch = _our_batch(real_pairs, reference)
    summed, count, _ = dpo.make_loss_fn(dpo.LossConfig("sigmoid", 0.1, 0.2))(policy, batch, None)
    assert float(summed / count) == pytest.approx(0.8 * straight + 0.2 * flipped, abs=TOL)


@pytest.mark.slow  # TRL's trainer and ours, a step each
def test_gradients_and_one_optimizer_step_equal_trls_trainer(models, real_pairs, trl_setup, tmp_path):
    policy, reference = models
    settings = dict(learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                    adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, max_steps=1)
    trainer = trl_setup("sigmoid", str(tmp_path), **settings)
    _, batch = _our_batch(real_pairs, reference)
    # The gradient of the mean pair loss, parameter by parameter.
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(real_pairs))])
    trainer.model.train()
    trainer.compute_loss(trainer.model, trl_batch).backward()
    theirs = {k: p.grad.numpy() for k, p in trainer.model.named_parameters()}
    loss_fn = dpo.make_loss_fn(dpo.LossConfig("sigmoid", 0.1))
    grads = jax.grad(lambda m: (lambda s, c, _: s / c)(*loss_fn(m, batch, None)))(policy)
    ours = hf_llama.to_hf_state_dict(grads)
    scale = max(np.abs(g).max() for g in theirs.values())
    for name, grad in ours.items():
        np.testing.assert_allclose(grad, theirs[name], atol=1e-4 * scale, rtol=0, err_msg=name)
    # One step of TRL's trainer = one step of train.py's optimizer with the same settings.
    trainer.model.zero_grad()
    trainer.train()
    config = train.TrainConfig(steps=10, batch_size=len(real_pairs), learning_rate=1e-3, min_lr_ratio=1.0,
                               warmup_steps=0, weight_decay=0.0, beta1=0.9, beta2=0.95, adam_eps=1e-8,
                               grad_clip=1.0, opt_state_dtype="float32")
    optimizer = optim.make_optimizer(config)
    updates, _ = optimizer.update(grads, optimizer.init(policy), policy)
    stepped = hf_llama.to_hf_state_dict(optax.apply_updates(policy, updates))
    before = hf_llama.to_hf_state_dict(policy)
    after = {k: p.detach().numpy() for k, p in trainer.model.named_parameters()}
    tiny = {k: (g != 0) & (np.abs(g) < 100 * config.adam_eps) for k, g in ours.items()}
    moving = sum(int((g != 0).sum()) for g in ours.values())
    assert sum(int(t.sum()) for t in tiny.values()) < 0.1 * moving  # most weights are compared
    for name, value in stepped.items():
        # Adam's first step moves each weight by lr * g / (|g| + eps): compare the moves in units
        # of lr, except where |g| ~ eps and float rounding of g itself decides the move.
        ours_move, their_move = (value - before[name]) / 1e-3, (after[name] - before[name]) / 1e-3
        np.testing.assert_allclose(np.where(tiny[name], 0, ours_move), np.where(tiny[name], 0, their_move),
                                   atol=2e-3, err_msg=name)


def _never_loaded():
    pytest.fail("the reference model was loaded although its log-probabilities were stored")


def test_online_reference_equals_the_stored_one_and_a_second_start_reads_it_back(models, real_pairs, tmp_path):
    policy, reference = models
    rows, batch = _our_batch(real_pairs, reference)
    config = dpo.LossConfig("sigmoid", 0.1)
    stored = dpo.make_loss_fn(config)(policy, batch, None)
    online = dpo.make_loss_fn(config, reference)(policy, {k: v for k, v in batch.items() if k != "reference_logps"},
                                                 None)
    for a, b in zip(jax.tree.leaves(stored), jax.tree.leaves(online)):
        assert float(a) == pytest.approx(float(b), abs=1e-5)
    mesh, logs = parallel.make_mesh(1), []
    cache = prepared.Cache(str(tmp_path), log=logs.append)
    parts = {"kind": "dpo reference log-probabilities", "pairs": ["abc"],
             "reference": dpo.reference_identity("runs/sft", {"dtype": "float32"})}
    first, how = dpo.stored_reference_logps({"train": rows}, lambda: reference, parts, cache, 4, mesh)
    assert how.startswith("computed") and np.allclose(first["train"], batch["reference_logps"], atol=1e-5)
    again, how = dpo.stored_reference_logps({"train": rows}, _never_loaded, parts, cache, 4, mesh)
    assert how.startswith("read") and np.array_equal(again["train"], first["train"])  # not recomputed
    assert logs[-1].startswith("reference log-probabilities: cache hit")
    other = {**parts, "reference": dpo.reference_identity("runs/other", {"dtype": "float32"})}
    _, how = dpo.stored_reference_logps({"train": rows}, lambda: reference, other, cache, 4, mesh)
    assert how.startswith("computed")  # another --init_from is another reference
    assert "differs in reference.init_from" in logs[-2]


# The tiny config's shape (configs/tiny.flags), not the tiny run: these tests need no training.
SMALL = ModelConfig(vocab_size=4096, d_model=192, n_layers=4, n_heads=3, d_ff=512, max_seq_len=128)


def test_online_reference_is_an_argument_of_the_step_not_constants_baked_into_it():
    reference = Transformer(SMALL, jax.random.key(1))
    config, mesh = train.TrainConfig(steps=10, batch_size=4, warmup_steps=1), parallel.make_mesh(1)
    arguments = train_step.step_arguments(SMALL, config, mesh, pair_packing.pair_row(64))
    optimizer = optim.make_optimizer(config)
    size = {}
    for name, loss_fn in (("stored", dpo.make_loss_fn(dpo.LossConfig())),
                          ("online", dpo.make_loss_fn(dpo.LossConfig(), reference))):
        step = train_step.make_train_step(optimizer, parallel.shardings(arguments[0]), mesh, loss_fn, config)
        size[name] = len(step.lower(*arguments).as_text())
    # Closed over, the reference's 3.3M parameters were constants of the program: 25.8 MiB of
    # text against 0.3 MiB. As arguments, the online step is the stored one plus a forward pass.
    assert size["online"] < 2 * size["stored"], size


def test_stored_reference_is_loaded_only_to_compute_its_log_probabilities_then_freed(models, real_pairs, tmp_path):
    _, reference = models
    rows, batch = _our_batch(real_pairs, reference)
    mesh, cache = parallel.make_mesh(1), prepared.Cache(str(tmp_path))
    parts = {"kind": "dpo reference log-probabilities", "pairs": ["freed"],
             "reference": dpo.reference_identity("runs/sft", {"dtype": "float32"})}
    live = lambda: sum(x.nbytes for x in jax.live_arrays())
    before, loaded = live(), []

    def load():
        loaded.append(jax.tree.map(jnp.copy, reference))  # a fresh copy on the device, as main() loads it
        return loaded.pop()

    values, how = dpo.stored_reference_logps({"train": rows}, load, parts, cache, 4, mesh)
    assert how.startswith("computed") and np.allclose(values["train"], batch["reference_logps"], atol=1e-5)
    reference_bytes = sum(x.nbytes for x in jax.tree.leaves(reference))
    assert live() - before < reference_bytes / 10, (live() - before, reference_bytes)


@pytest.mark.slow  # compiles the pair step and the reference pass
def test_dry_run_counts_both_sequences_of_a_pair_and_what_the_reference_costs(capsys):
    config = train.TrainConfig(steps=10, batch_size=8, grad_accum=2, warmup_steps=1)
    loss_config, printed = dpo.LossConfig(), {}
    for online in (False, True):
        step = functools.partial(dpo.compile_step, loss_config=loss_config, max_length=64, online=online)
        before = [] if online else [("reference pass", functools.partial(dpo.compile_reference_pass, max_length=64))]
        train_step.dry_run(SMALL, config, 1, "", 0.4, 1.0, step, before=before,
                      workload=budget.Workload(2, 64, extra_forward=online))
        printed[online] = dict(re.match(r"(.+?)\s{2,}(.*)", line).groups()
                               for line in capsys.readouterr().out.splitlines() if "  " in line)
    stored, online = printed[False], printed[True]
    assert stored["tokens per step"].startswith("1,024 (8 x 2 x 64,")  # not 8 x 128
    assert stored["reference pass: per-chip peak"].endswith("(runs before the steps; its memory is freed before them)")
    assert "reference pass: per-chip peak" not in online
    argument = lambda rows: float(rows["per-chip memory: arguments"].split()[0])  # MiB at this size
    reference_mib = num_params(SMALL) * 4 / 2**20
    assert argument(online) - argument(stored) == pytest.approx(reference_mib, rel=0.05)
    flops = lambda rows: float(rows[next(k for k in rows if k.startswith("FLOPs"))])
    assert flops(online) == pytest.approx(4 / 3 * flops(stored), rel=0.01)  # printed to 3 digits


@pytest.mark.slow
def test_pairs_are_prepared_over_two_processes_once_then_read_back(tokenizer, tmp_path, monkeypatch):
    config = dpo.DataConfig((f"{PAIRS}:2", os.path.join(os.path.dirname(PAIRS), "en_hh_rlhf_harmless_test_pairs_first200.jsonl") + ":1"),
                            MAX_LENGTH, 96, validation_fraction=0.1)
    rows, validation, stats = dpo.prepare(config, tokenizer)
    monkeypatch.setattr(prepared, "CHUNK", 32)  # several chunks per file, so the pool does run
    logs = []
    cache = prepared.Cache(str(tmp_path), log=logs.append)
    for _ in range(2):
        again = dpo.prepare(config, tokenizer, workers=2, cache=cache)
        for a, b in zip((rows, validation), again[:2]):
            for field in ("tokens", "reply"):
                np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
        assert again[2] == stats
    assert "prepared pairs: cache miss" in logs[0] and logs[-1].startswith("prepared pairs: cache hit")
    assert sum(s.truncated for s in stats) > 0 and validation.num_rows == sum(s.validation for s in stats)


# --------------------------------------------------------------------------------------------
# A preference the tiny model can learn, and the loss mask that makes it learnable.


def _language_pairs(tokenizer, n: int, seed: int) -> list[pair_packing.RenderedPair]:
    """Prompt: a line of a sample book; chosen: another French line, rejected: an English one,
    of random lengths (so the untrained preference is a coin toss)."""
    lines = {}
    for lang in ("en", "fr"):
        text = " ".join(open(os.path.join(REPO, "samples", name), encoding="utf-8").read()
                        for name in sorted(os.listdir(os.path.join(REPO, "samples"))) if name.startswith(lang))
        words = text.split()
        lines[lang] = [" ".join(words[i: i + 12]) for i in range(0, 30_000, 12)]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        fr, en = (lines[lang][int(rng.integers(len(lines[lang])))] for lang in ("fr", "en"))
        cut = lambda s: " ".join(s.split()[: int(rng.integers(3, 12))])
        prompt = lines["en"][int(rng.integers(len(lines["en"])))]
        pair = chat_formats.Pair(({"role": "system", "content": "Réponds."}, {"role": "user", "content": prompt}),
                        cut(fr), cut(en))
        out.append(pair_packing.render_pair(tokenizer, pair, 64, 32)[0])
    return out


@pytest.mark.slow  # 15 DPO steps per mask
@pytest.mark.parametrize("mask", ["reply", "prompt"])
def test_reward_accuracy_on_held_out_pairs_rises_to_09_and_only_with_the_reply_mask(mask, models, tokenizer):
    _, reference = models
    train_rows, held_rows = (pair_packing.to_rows(_language_pairs(tokenizer, n, seed), 64)
                             for n, seed in ((64, 0), (32, 1)))
    if mask == "prompt":  # broken on purpose: the loss reads the (shared) prompt, not the replies
        broken = lambda rows: dataclasses.replace(rows, reply=(rows.tokens != 0) & ~rows.reply)
        train_rows, held_rows = broken(train_rows), broken(held_rows)
    mesh = parallel.make_mesh(1)
    ref_train, ref_held = (dpo.reference_logps(reference, r, 16, mesh) for r in (train_rows, held_rows))
    held = {k: jnp.asarray(v)
            for k, v in pair_packing.pair_arrays(held_rows, np.arange(held_rows.num_rows), ref_held).items()}
    loss_fn = dpo.make_loss_fn(dpo.LossConfig("sigmoid", 0.1))

    @eqx.filter_jit
    def held_out(model):
        """(share of pairs where the model's reply log-probabilities prefer the chosen reply,
        DPO's reward accuracy)."""
        policy = dpo.sequence_logps(model, held["tokens"], held["weights"])
        _, count, sums = loss_fn(model, held, None)
        return jnp.mean(policy[:, 0] > policy[:, 1]), sums["rewards/accuracies"] / count

    before = float(held_out(reference)[0])
    assert 0.2 <= before <= 0.8 or mask == "prompt"  # the untrained model has no such preference
    config = train.TrainConfig(steps=15, batch_size=8, learning_rate=1e-3, warmup_steps=2, weight_decay=0.0,
                               opt_state_dtype="float32")
    optimizer = optim.make_optimizer(config)
    start = jax.tree.map(jnp.copy, reference)  # the step donates its state
    state = train_step.TrainState(start, optimizer.init(start))
    step_fn = train_step.make_train_step(optimizer, parallel.shardings(state), mesh, loss_fn)
    source = pair_packing.PairBatches(train_rows, ref_train, 0, 8)
    for step in range(config.steps):
        batch = parallel.global_batch(source.batch(step), 1, mesh)
        state, metrics = step_fn(state, batch, jax.random.key(0), step, False, parallel.stop_votes(False, mesh))
    accuracy = float(held_out(state.model)[1])
    if mask == "reply":
        assert accuracy >= 0.9
    else:
        assert accuracy < 0.9  # the same check fails when the loss reads the wrong tokens


# --------------------------------------------------------------------------------------------
# Formats, truncation, bad input.

MESSAGES = [{"role": "user", "content": "Hi?"}]
FORMAT_CASES = {
    "standard": {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."},
    "conversational": {"prompt": MESSAGES, "chosen": [{"role": "assistant", "content": "Hello."}],
                       "rejected": [{"role": "assistant", "content": "Go away."}]},
    "hh_rlhf": {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."},
    "ultrafeedback": {"prompt": "Hi?", "chosen": [*MESSAGES, {"role": "assistant", "content": "Hello."}],
                      "rejected": [*MESSAGES, {"role": "assistant", "content": "Go away."}], "score_chosen": 8.0},
}


@pytest.mark.parametrize("fmt", FORMAT_CASES)
def test_each_format_gives_the_same_pair(fmt):
    expected = chat_formats.Pair(({"role": "system", "content": DEFAULT_SYSTEM}, *MESSAGES), "Hello.", "Go away.")
    assert chat_formats.detect_pair_format(FORMAT_CASES[fmt]) == fmt
    assert chat_formats.to_pair(FORMAT_CASES[fmt]) == expected
    assert chat_formats.to_pair(FORMAT_CASES[fmt], fmt) == expected


def test_a_standard_prompt_written_as_an_hh_transcript_becomes_its_turns():
    record = {"prompt": "\n\nHuman: a?\n\nAssistant: b.\n\nHuman: c?\n\nAssistant:", "chosen": " d.", "rejected": " e."}
    pair = chat_formats.to_pair(record)
    assert [(m["role"], m["content"]) for m in pair.prompt[1:]] == [("user", "a?"), ("assistant", "b."), ("user", "c?")]
    assert (pair.chosen, pair.rejected) == ("d.", "e.")


def test_overlong_pairs_keep_the_end_of_the_prompt_then_cut_the_replies(tokenizer):
    pair = chat_formats.Pair(({"role": "system", "content": "S"}, {"role": "user", "content": "word " * 60}),
                    "yes " * 40, "no")
    full, status = pair_packing.render_pair(tokenizer, pair, 10_000, 9_999)
    assert status == "ok"
    cut, status = pair_packing.render_pair(tokenizer, pair, 60, 20)
    assert status == "reply cut" and len(cut.prompt) == 20 and len(cut.prompt) + len(cut.chosen) == 60
    assert cut.prompt.tolist() == full.prompt[-20:].tolist()  # the end: the assistant header stays
    assert cut.chosen.tolist() == full.chosen[:40].tolist() and cut.rejected.tolist() == full.rejected.tolist()
    _, status = pair_packing.render_pair(tokenizer, dataclasses.replace(pair, chosen="yes"), 80, 30)
    assert status == "prompt cut"


def test_the_reply_mask_is_the_reply_and_its_im_end_only(tokenizer):
    pair = chat_formats.to_pair(FORMAT_CASES["standard"])
    rows = pair_packing.to_rows([pair_packing.render_pair(tokenizer, pair, 64, 32)[0]], 64)
    for k, reply in enumerate(("Hello.", "Go away.")):
        ids = rows.tokens[0, k][rows.reply[0, k]].tolist()
        assert ids[-1] == IM_END_ID and tokenizer.decode(ids[:-1]) == reply
    batch = pair_packing.pair_arrays(rows, np.array([0, -1]), np.ones((1, 2), np.float32))
    assert (batch["weights"][0] == rows.reply[0][:, 1:]).all() and batch["pairs"].tolist() == [1.0, 0.0]
    assert batch["weights"][1].sum() == 0 and batch["reference_logps"][1].tolist() == [0.0, 0.0]


def test_bad_records_are_counted_and_skipped_or_fail_naming_file_and_line(tmp_path):
    good = FORMAT_CASES["standard"]
    records = [good, good, "{not json", {**good, "rejected": good["chosen"]},
               {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: x\n\nAssistant: c"},
               {"prompt": "p", "chosen": "", "rejected": "r"}, [1, 2], good, good, good]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    pairs, stats = chat_formats.load_pairs(path, max_bad_fraction=0.5)
    assert len(pairs) == 5 and stats.records == 10
    assert dict(stats.bad) == {"invalid JSON": 1, "identical replies": 1, "prompts differ": 1,
                               "empty content": 1, "wrong shape": 1}
    with pytest.raises(ValueError, match=r"pairs.jsonl, line 3: invalid JSON.*5 of 10 records"):
        chat_formats.load_pairs(path, max_bad_fraction=0.1)


def test_cli_reports_bad_input_in_one_line_with_exit_status_2(tiny_run, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [FORMAT_CASES["standard"], {**FORMAT_CASES["standard"], "rejected": "Hello."}])
    cases = [(["--init_from=" + tiny_run, "--train_data=" + path, "--max_bad_fraction=0"], "p.jsonl, line 2: identical"),
             (["--init_from=" + tiny_run, "--train_data=" + path, "--max_length=4096"], "--max_length=4096 exceeds"),
             (["--train_data=" + path], "--init_from is required")]
    for args, message in cases:
        result = forked.run([sys.executable, "dpo.py", "--flagfile=configs/dpo_tiny.flags",
                             f"--output_dir={tmp_path}/out", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.stderr


def test_the_bundled_preference_samples_load_cleanly(tokenizer):
    for name in sorted(os.listdir(os.path.join(REPO, "samples", "preference"))):
        if name.endswith(".jsonl"):
            pairs, stats = chat_formats.load_pairs(os.path.join(REPO, "samples", "preference", name))
            assert len(pairs) == stats.records >= 100 and not stats.bad
            assert all(p.prompt[-1]["role"] == "user" and p.chosen == p.chosen.strip() for p in pairs)


# --------------------------------------------------------------------------------------------
# Pairs packed into shared rows.


def test_packed_pairs_get_the_log_probabilities_loss_and_metrics_they_get_unpacked(models, tokenizer):
    policy, reference = models
    pairs, _ = chat_formats.load_pairs(PAIRS)
    rendered = [r for r in (pair_packing.render_pair(tokenizer, p, 32, 16)[0] for p in pairs[:16]) if r is not None]
    unpacked, packed = pair_packing.to_rows(rendered, 32), pair_packing.pack_pairs(rendered, MAX_LENGTH + 1)
    slots = pair_packing.slots_of(packed)
    assert packed.num_rows <= len(rendered) / 2 and slots >= 2  # shared rows
    assert packed.supervised_tokens == unpacked.supervised_tokens  # every reply token, once
    mesh = parallel.make_mesh(1)
    alone = dpo.reference_logps(reference, unpacked, 4, mesh)
    together = dpo.reference_logps(reference, packed, 2, mesh)
    batch = pair_packing.packed_arrays(packed, np.arange(packed.num_rows), together, slots)
    used = together.reshape(-1, 2)[batch["pairs"].reshape(-1) > 0]
    assert len(used) == len(rendered)
    np.testing.assert_allclose(used[np.lexsort(used.T[::-1])], alone[np.lexsort(alone.T[::-1])], atol=1e-4)
    plain = {k: jnp.asarray(v) for k, v in pair_packing.pair_arrays(unpacked, np.arange(len(rendered)), alone).items()}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    for loss in ("sigmoid", "ipo"):
        config = dpo.LossConfig(loss, 0.1)
        expected = dpo.make_loss_fn(config)(policy, plain, None)
        for got in (dpo.make_loss_fn(config)(policy, batch, None),
                    dpo.make_loss_fn(config, reference)(policy, {k: v for k, v in batch.items()
                                                                 if k != "reference_logps"}, None)):
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
                assert float(a) == pytest.approx(float(b), rel=1e-4, abs=1e-4)


@pytest.mark.slow
def test_dpo_trains_on_packed_pairs_and_resumes_from_the_cache(tiny_run, tmp_path):
    out = str(tmp_path / "dpo")
    args = ["--flagfile=configs/dpo_tiny.flags", f"--init_from={tiny_run}", f"--train_data={PAIRS}",
            f"--output_dir={out}", "--pack_pairs", "--max_length=32", "--max_prompt_length=16", "--epochs=0",
            "--warmup_ratio=0", "--eval_every=2", "--checkpoint_every=2", "--batch_size=2"]
    first = run_script("dpo.py", *args, "--steps=2").stdout
    assert "pairs packed in" in first and "reference log-probabilities: stored in" in first
    second = run_script("dpo.py", *args, "--steps=4").stdout
    assert "prepared pairs: cache hit" in second and "reference log-probabilities: cache hit" in second
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [2, 4] and all(np.isfinite(r["loss"]) for r in steps)
    assert all("rewards/accuracies" in r for r in steps) and any("eval_rewards/margins" in r for r in records)


def test_a_llama3_template_splits_prompt_and_replies_where_transformers_renders_them(llama3_tokenizer_dir):
    tokenizer = open_tokenizer(llama3_tokenizer_dir)
    hf = transformers.AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    pair = chat_formats.to_pair(FORMAT_CASES["standard"])
    rendered, status = pair_packing.render_pair(tokenizer, pair, 256, 128)
    prompt = list(pair.prompt)
    assert status == "ok" and rendered.prompt.tolist() == hf.apply_chat_template(
        prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    eot = hf.convert_tokens_to_ids("<|eot_id|>")
    for reply, ids in ((pair.chosen, rendered.chosen), (pair.rejected, rendered.rejected)):
        assert ids.tolist() == [*hf(reply, add_special_tokens=False).input_ids, eot]
        whole = hf.apply_chat_template([*prompt, {"role": "assistant", "content": reply}], tokenize=True,
                                       return_dict=True)["input_ids"]
        assert whole == rendered.prompt.tolist() + ids.tolist()


def test_a_reply_whose_first_characters_merge_into_the_prompt_keeps_its_whole_rendering(tmp_path):
    """A template whose generation prompt ends in a space ("assistant: "): byte-level BPE spells
    " Hello" as one token, so a reply's first word takes the prompt's last token. The prompt is
    what both replies' renderings share and each reply keeps the rest."""
    import conftest

    template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    folder = conftest.write_hf_tokenizer(str(tmp_path), ["<|endoftext|>"],
                                         config={"eos_token": "<|endoftext|>", "chat_template": template})
    tokenizer = open_tokenizer(folder)
    pair = chat_formats.Pair(({"role": "user", "content": "Hi?"},), "Hello.", "\nGo away.")
    prompts = [pair_packing._split_reply(tokenizer, pair.prompt, reply)[0].tolist()
               for reply in (pair.chosen, pair.rejected)]
    assert prompts[0] == prompts[1][:-1]  # the rejected reply leaves the prompt's final " " alone
    rendered, status = pair_packing.render_pair(tokenizer, pair, 256, 128)
    assert status == "ok" and rendered.prompt.tolist() == prompts[0]
    for reply, ids in ((pair.chosen, rendered.chosen), (pair.rejected, rendered.rejected)):
        whole = tokenizer.chat_ids([*pair.prompt, {"role": "assistant", "content": reply}])
        assert rendered.prompt.tolist() + ids.tolist() == whole
        assert tokenizer.decode(ids) == f" {reply}\n"  # the prompt's final space belongs to both replies
