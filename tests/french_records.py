"""Records in the schema of each French task of evaluate.py's `french` preset, for the tasks
whose data is not at hand offline (only XWinograd-fr's real items are: samples/eval_fr/).

Each task's fields are those its lm-eval YAML reads (doc_to_text, doc_to_choice, doc_to_target,
process_docs), with the types of the hub dataset it loads; the text is real French prose from
samples/fr_*.txt, the labels are drawn at random. Such records check that a backend scores each
task as lm-eval's `hf` backend does; they give no score. The tests and
benchmarks/eval_speed.py --tasks=french both use them.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
from collections.abc import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Prose:
    """Random sentences, passages and words of the bundled French novels."""

    def __init__(self, seed: int = 0):
        sentences = []
        for path in sorted(glob.glob(os.path.join(REPO, "samples", "fr_*.txt"))):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    sentences += [s for s in re.split(r"(?<=[.!?])\s+", line.strip()) if 30 <= len(s) <= 200]
        self.sentences = sentences
        self.rng = random.Random(seed)

    def sentence(self) -> str:
        return self.rng.choice(self.sentences)

    def passage(self, n: int = 5) -> str:
        start = self.rng.randrange(len(self.sentences) - n)
        return " ".join(self.sentences[start: start + n])

    def words(self, n: int = 1) -> str:
        words = self.sentence().rstrip(".!?").split()
        start = self.rng.randrange(max(1, len(words) - n))
        return " ".join(words[start: start + n])

    def with_blank(self) -> str:
        """A sentence with one word replaced by FrenchBench's blank marker."""
        words = self.sentence().split()
        words[self.rng.randrange(len(words))] = "<...>"
        return " ".join(words)

    def pick(self, options):
        return self.rng.choice(list(options))


def _nli(p: Prose) -> dict:
    return {"premise": p.sentence(), "hypothesis": p.sentence(), "label": p.rng.randrange(3)}


def _blank_mcq(p: Prose) -> dict:
    return {"question": p.with_blank(), **{f"answer{k}": p.words() for k in "ABCD"}, "answer": p.pick("ABCD")}


FIELDS: dict[str, Callable[[Prose], dict]] = {
    # facebook/xnli fr
    "xnli_fr": _nli,
    "french_bench_xnli": _nli,
    # google-research-datasets/paws-x fr
    "paws_fr": lambda p: {"id": p.rng.randrange(10**6), "sentence1": p.sentence(), "sentence2": p.sentence(),
                          "label": p.rng.randrange(2)},
    # facebook/belebele fra_Latn: a FLORES passage, a question, four answers, the right one's number
    "belebele_fra_Latn": lambda p: {
        "link": "https://fr.wikinews.org/wiki/x", "question_number": p.rng.randrange(1, 3),
        "flores_passage": p.passage(6), "question": p.words(6) + " ?",
        **{f"mc_answer{k}": p.words(3) for k in range(1, 5)}, "correct_answer_num": str(p.rng.randrange(1, 5)),
        "dialect": "fra_Latn", "ds": "2023-05-03"},
    # EleutherAI/lambada_openai fr: a passage whose last word is predicted
    "lambada_openai_mt_fr": lambda p: {"text": p.passage(3).rstrip(".!?")},
    # manu/french_bench_hellaswag: HellaSwag's fields, label a string
    "french_bench_hellaswag": lambda p: {
        "ind": p.rng.randrange(10**5), "activity_label": p.words(2).capitalize(), "ctx_a": p.sentence(),
        "ctx_b": p.words(4), "ctx": "", "endings": [p.sentence() for _ in range(4)],
        "source_id": "x", "split": "val", "split_type": "indomain", "label": str(p.rng.randrange(4))},
    # manu/french_bench_arc_challenge: choices a list of strings, answerKey a letter
    "french_bench_arc_challenge": lambda p: {
        "id": f"x{p.rng.randrange(10**5)}", "question": p.words(8) + " ?",
        "choices": [p.words(3) for _ in range(4)], "answerKey": p.pick("ABCD")},
    # manu/french_boolq
    "french_bench_boolqa": lambda p: {"question": p.words(7) + " ?", "passage": p.passage(4),
                                      "label": p.rng.randrange(2)},
    # manu/french-bench-grammar-vocab-reading, splits Grammar, Vocabulary, Reading
    "french_bench_grammar": _blank_mcq,
    "french_bench_vocab": _blank_mcq,
    "french_bench_reading_comp": lambda p: {
        "context": p.passage(5), **_blank_mcq(p),
        **({"question": p.words(6)} if p.rng.random() < 0.5 else {})},  # with and without a blank
    # manu/topic_based_nli_test
    "french_bench_topic_based_nli": lambda p: {"text": p.passage(2), "topic": p.words(1),
                                               "polarity": p.pick(["positif", "negatif", "neutre"])},
}


def write_records(directory: str, per_task: int, seed: int = 0) -> None:
    """directory/<task>.jsonl for every task of FIELDS, per_task records each."""
    prose = Prose(seed)
    os.makedirs(directory, exist_ok=True)
    for task, make in FIELDS.items():
        with open(os.path.join(directory, f"{task}.jsonl"), "w", encoding="utf-8") as f:
            for _ in range(per_task):
                f.write(json.dumps(make(prose), ensure_ascii=False) + "\n")
