"""Training data.

For now: plain text files, tokenized once at start-up into one token stream and cut into
fixed-length records (the data issue adds the corpus pipeline and shards).

The batch of step `s` is a pure function of `(seed, s)`: epoch `e` visits the records in a
permutation seeded by `(seed, e)`, and step `s` takes the next `batch_size` of that endless
sequence. Resuming needs only the step, and any host can compute any slice of any batch.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from tokenizer import Tokenizer


def read_documents(path: str) -> list[str]:
    """A text file's documents: one per non-empty line (paragraphs, in the bundled sample)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--train_data file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


class TokenRecords:
    """Fixed-length records of `seq_len + 1` tokens (inputs plus the shifted targets)."""

    def __init__(self, paths: Sequence[str], tokenizer: Tokenizer, seq_len: int, seed: int,
                 global_batch_size: int = 1, grad_accum: int = 1, process_index: int = 0,
                 process_count: int = 1):
        documents = [doc for path in paths for doc in read_documents(path)]
        # <s> and </s> around each document, so a prompt starting with <s> looks like training
        # data and the model learns where a document ends.
        ids = [tok for doc in tokenizer.encode_batch(documents, bos=True, eos=True) for tok in doc]
        self.record_len = seq_len + 1
        n = len(ids) // self.record_len
        if n == 0:
            raise ValueError(
                f"--train_data {','.join(paths)} holds {len(ids)} tokens: expected at least "
                f"seq_len + 1 = {self.record_len}")
        dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
        self.records = np.asarray(ids[: n * self.record_len], dtype).reshape(n, self.record_len)
        self.seed = seed
        self.global_batch_size, self.grad_accum = global_batch_size, grad_accum
        self.process_index, self.process_count = process_index, process_count

    @property
    def num_tokens(self) -> int:
        return self.records.size

    def epoch(self, step: int) -> float:
        return (step + 1) * self.global_batch_size / len(self.records)

    def batch(self, step: int, batch_size: int | None = None) -> np.ndarray:
        """This process's rows of step `step`'s global batch, int32 (batch_size, seq_len + 1)."""
        if batch_size is not None:
            return self._global_rows(step, batch_size)
        rows = self._global_rows(step, self.global_batch_size)
        micro = rows.reshape(self.grad_accum, self.process_count, -1, self.record_len)
        return micro[:, self.process_index].reshape(-1, self.record_len)

    def iterate(self, start_step: int):
        step = start_step
        while True:
            yield step, self.batch(step)
            step += 1

    def _global_rows(self, step: int, batch_size: int) -> np.ndarray:
        n = len(self.records)
        flat = np.arange(step * batch_size, (step + 1) * batch_size)
        epochs, offsets = np.divmod(flat, n)
        rows = np.empty_like(flat)
        for epoch in np.unique(epochs):
            permutation = np.random.default_rng([self.seed, int(epoch)]).permutation(n)
            rows[epochs == epoch] = permutation[offsets[epochs == epoch]]
        return self.records[rows].astype(np.int32)


def open_train_data(spec: str, *, tokenizer: Tokenizer, seq_len: int, seed: int,
                    global_batch_size: int, grad_accum: int = 1, process_index: int = 0,
                    process_count: int = 1, split: str = "train") -> TokenRecords:
    paths = spec.split(",")
    return TokenRecords(paths, tokenizer, seq_len, seed, global_batch_size, grad_accum,
                        process_index, process_count)
