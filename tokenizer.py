"""Tokenizers: the one interface (`Tokenizer`; tokenizer_files.py opens either kind), and ours
(SentencePiece BPE: training, special ids, ChatML rendering, a CLI).

    python tokenizer.py --input=samples/a.txt,samples/b.txt --model_prefix=/tmp/tok --vocab_size=2000
    python tokenizer.py --model=/tmp/tok.model --stats=samples/en_doyle_sign_of_four.txt,samples/fr_maupassant_bel_ami.txt

The report's settings: BPE, vocabulary 50,000, character coverage 0.9999, byte fallback, and
eight special pieces at fixed ids, present from pretraining on:

    0 <pad>  1 <unk>  2 <s>  3 </s>  4 <|code|>  5 <|endcode|>  6 <|im_start|>  7 <|im_end|>

Choices that are ours (each measured, see tests/test_tokenizer.py):

* Text is kept byte for byte: identity normalization (no NFKC), whitespace runs kept, and byte
  fallback, so `decode(encode(x)) == x` for any text (one exception: U+2581 "▁", the piece
  space symbol, decodes to a space, as in LLaMA). Digits are split into single pieces, and
  0-9 are always pieces of the vocabulary, as in LLaMA, whatever the corpus: a corpus with few
  numbers would otherwise spell them as byte pieces ("42" as <0x34><0x32>). They are required
  characters, ordinary pieces, so the Hugging Face export needs nothing special for them.
* Newlines: SentencePiece trains on lines, so we feed each line of a document as one sentence.
  "\\n" therefore never enters the vocabulary and is encoded as the byte piece <0x0A>, as in
  LLaMA; a newline never merges with its neighbours.
* No dummy prefix (unlike LLaMA): `encode("Paris")` is ["Par", "is"], not ["▁Paris"]. With it,
  Hugging Face's tokenizer (which drops the dummy prefix when the text already starts with a
  space) disagrees with SentencePiece on text such as " answer" or indented code; without it
  the two agree on all text (hf_tokenizer.save_hf_tokenizer), `encode(a) + encode(" b")` is usually
  `encode(a + " b")` (what loglikelihood evaluation wants), and text between ChatML control
  tokens needs no special case. The price: a text's first word is spelled as after a newline.
* The ChatML/code tokens are control symbols, not user-defined ones: SentencePiece never
  produces them from text, so a user typing "<|im_end|>" cannot end a turn. Only
  `render_chat` emits them.

A model imported from Hugging Face (convert.py) brings its own tokenizer: hf_tokenizer.py reads
it behind the same interface, and writes either kind as a folder transformers loads;
tokenizer_files.py opens whichever kind a path or a checkpoint holds.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence

import sentencepiece as spm

SPECIAL_TOKENS = (
    "<pad>", "<unk>", "<s>", "</s>", "<|code|>", "<|endcode|>", "<|im_start|>", "<|im_end|>"
)
# Our SentencePiece model's ids. Code reads a tokenizer's roles from it (tok.bos_id, tok.eos_id, ...):
# a Hugging Face tokenizer has its own. PAD_ID alone is also used as the filler of padding
# positions, which no loss or attention reads: id 0 exists in every vocabulary.
PAD_ID, UNK_ID, BOS_ID, EOS_ID, CODE_ID, ENDCODE_ID, IM_START_ID, IM_END_ID = range(8)
CHAT_ROLES = ("system", "user", "assistant")
# The report's system turn, for chats and SFT records that bring none.
DEFAULT_SYSTEM = "You are a helpful assistant."

NUM_BYTE_PIECES = 256  # byte fallback reserves one piece per byte value
DIGITS = "0123456789"
# SentencePiece skips longer lines; its default (4192 bytes) would drop long paragraphs.
MAX_SENTENCE_BYTES = 16_384

# The same rendering as Tokenizer.render_chat, for Hugging Face's apply_chat_template. It gives
# identical ids because HF splits the rendered string at special tokens and encodes each chunk
# on its own, as render_chat does (checked in the tests).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _lines_of_files(paths: Sequence[str | os.PathLike]) -> Iterator[str]:
    for path in paths:
        with open(path, encoding="utf-8") as f:
            number = 0
            try:
                for number, line in enumerate(f, 1):  # one line at a time: memory stays bounded
                    yield line.rstrip("\n")
            except UnicodeDecodeError as e:
                raise ValueError(f"{os.fspath(path)}: not UTF-8 text at or after line {number + 1} ({e.reason}); "
                                 "expected UTF-8 text, one paragraph per line") from None


def _lines_of_documents(documents: Iterable[str]) -> Iterator[str]:
    for doc in documents:
        # split("\n"), not splitlines(): only "\n" is a line break to the tokenizer; other
        # separators (\r, \x0b, \u2028...) stay ordinary characters and round-trip as such.
        yield from doc.split("\n")


def train_tokenizer(
    inputs: Sequence[str | os.PathLike] | Iterator[str],
    model_prefix: str,
    vocab_size: int = 50_000,
    character_coverage: float = 0.9999,
    max_sentences: int = 2_000_000,
    num_threads: int | None = None,
    verbose: bool = False,
) -> str:
    """Trains the BPE model and writes PREFIX.model and PREFIX.vocab; returns PREFIX.model.

    inputs: a list or tuple of text files (UTF-8, read line by line), or an iterator of
      document strings (e.g. a generator over a corpus; pass iter(docs) for a list of texts).
    max_sentences: how many lines SentencePiece keeps, drawn uniformly at random from all the
      input (reservoir sampling), so a corpus of any size trains in bounded memory.
    """
    min_vocab = len(SPECIAL_TOKENS) + NUM_BYTE_PIECES + len(DIGITS)
    if vocab_size <= min_vocab:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: it must exceed {min_vocab} "
            f"({len(SPECIAL_TOKENS)} special + {NUM_BYTE_PIECES} byte + {len(DIGITS)} digit pieces) "
            "plus the characters of the corpus"
        )
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]  # one file path
    if isinstance(inputs, (list, tuple)):
        for path in inputs:
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"tokenizer training input not found: {os.fspath(path)!r} (to train on "
                    "document strings, pass an iterator, e.g. iter(documents))"
                )
            if not os.path.getsize(path):
                raise ValueError(f"tokenizer training input {os.fspath(path)!r} is empty: expected UTF-8 "
                                 "text, one paragraph per line")
        sentences = _lines_of_files(inputs)
    else:
        sentences = _lines_of_documents(inputs)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    except OSError as e:
        raise ValueError(f"model_prefix {model_prefix!r}: cannot create its directory ({e.strerror}); "
                         "expected a writable PATH/PREFIX") from None
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=(s for s in sentences if s),
            model_prefix=model_prefix,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            byte_fallback=True,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
            control_symbols=list(SPECIAL_TOKENS[CODE_ID:]),  # ids 4..7, in this order
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=MAX_SENTENCE_BYTES,
            # As LLaMA: keep text as is (NFKC and collapsed spaces lose code indentation and
            # make the Hugging Face export disagree), one piece per digit, and pieces made of
            # spaces only (indentation).
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            required_chars=DIGITS,  # pieces even when the corpus has none (see the docstring)
            allow_whitespace_only_pieces=True,
            add_dummy_prefix=False,  # see the module docstring
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=0 if verbose else 2,
        )
    except RuntimeError as e:
        if "Vocabulary size" in str(e):  # too small for the corpus' characters, or too large for it
            raise ValueError(f"vocab_size={vocab_size} does not fit this corpus: {e}") from e
        if "sentences_.empty()" in str(e):
            raise ValueError("the tokenizer's training input holds no text (blank lines only): expected "
                             "UTF-8 text, one paragraph per line") from None
        raise
    return model_prefix + ".model"


def language_of(spec: str) -> tuple[str, str]:
    """(language, path) of 'lang=path', or of a path whose file name starts with a language code
    ('en_novel.txt' is en); a file with neither counts as a language of its own name."""
    if "=" in spec:
        label, path = spec.split("=", 1)
        return label, path
    match = re.match(r"([a-z]{2})_", os.path.basename(spec))
    return (match.group(1) if match else os.path.basename(spec)), spec


class Tokenizer:
    """A tokenizer of either kind, with the same interface: ours (SentencePiece, `SentencePieceTokenizer`)
    or a Hugging Face one (`tokenizer.json`, hf_tokenizer.py's `HFTokenizer`). tokenizer_files.py's
    `open_tokenizer` and `tokenizer_from_bytes` pick the kind.

    Special tokens by role, read from the tokenizer's own files (ours: the fixed ids above):
    bos_id, eos_id, pad_id, unk_id (None where the tokenizer has none: byte-level BPE has no
    unk), im_start_id / im_end_id (ChatML's markers, where the vocabulary has them), code_id /
    endcode_id (the code share's wrappers <|code|>/<|endcode|>, where it has them),
    end_of_turn_id (the token that closes an assistant turn in the chat format) and
    chat_stop_ids (where a chat reply ends: eos and the end of turn).
    """

    bos_id: int | None
    eos_id: int
    pad_id: int | None
    unk_id: int | None
    im_start_id: int | None
    im_end_id: int | None
    code_id: int | None
    endcode_id: int | None
    chat_template: str | None  # jinja, as transformers renders it; None: the tokenizer cannot chat

    @property
    def model_bytes(self) -> bytes:
        """The tokenizer serialized, so that a checkpoint can carry it (tokenizer_from_bytes reads it back)."""
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def id_to_piece(self, token_id: int) -> str:
        raise NotImplementedError

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """The text's ids; special-token strings in it are text. bos: start it as this tokenizer
        starts a document (`document_prefix`); eos: end it with eos_id."""
        return self.encode_batch([text], bos, eos)[0]

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        raise NotImplementedError

    def encode_as_transformers(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """transformers' `tokenizer(text, add_special_tokens=...).input_ids` on this tokenizer's
        Hugging Face files (what lm-eval's hf backend scores): a Hugging Face tokenizer reads
        special-token strings in the text as those tokens; ours never does (its exported files
        would), as `encode`."""
        return self.encode(text, bos=add_special_tokens)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; special (control) tokens carry no text."""
        raise NotImplementedError

    @property
    def document_prefix(self) -> list[int]:
        """What starts a document: [<s>] for ours and Llama's; for a Hugging Face tokenizer,
        what its post-processor puts before a text (nothing for GPT-2-style byte-level BPE)."""
        raise NotImplementedError

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> list[int]:
        """The chat format's rendering of `messages` ([{role, content}]) as ids."""
        raise NotImplementedError

    def chat_ids(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> list[int]:
        """The conversation as the model reads it, from its first token: what SFT trains on and
        `generate.py --chat` prompts with (add_generation_prompt: opening the assistant's turn)."""
        raise NotImplementedError

    def chat_turns(self, messages: Sequence[dict]) -> tuple[list[int], list[tuple[int, int, int]]]:
        """(chat_ids(messages), one (start, stop, end) per assistant message): ids[start:stop]
        are its reply and the end-of-turn token that closes it (what SFT trains on, DPO scores),
        ids[:end] the conversation through that turn (where a cut may fall)."""
        raise NotImplementedError

    end_of_turn_id: int  # the token that closes an assistant turn in the chat format

    @property
    def has_code_wrappers(self) -> bool:
        """Whether the vocabulary has <|code|> and <|endcode|> (the code share's wrappers)."""
        return self.code_id is not None and self.endcode_id is not None

    @property
    def chat_stop_ids(self) -> tuple[int, ...]:
        """Where a chat reply ends: eos and the chat format's end of turn."""
        return tuple(dict.fromkeys((self.eos_id, self.end_of_turn_id)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


def check_messages(messages: Sequence[dict]) -> None:
    """ValueError naming the first message whose role is not ours or whose content is not text."""
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            expected = ", ".join(CHAT_ROLES)
            raise ValueError(f"message {i}: unknown role {role!r}; expected one of {expected}")
        if not isinstance(content, str):
            kind = type(content).__name__
            raise ValueError(f"message {i}: content must be a string, got {kind}")


class SentencePieceTokenizer(Tokenizer):
    """Ours (train_tokenizer): the special tokens at their fixed ids 0-7, ChatML by id."""

    bos_id, eos_id, pad_id, unk_id = BOS_ID, EOS_ID, PAD_ID, UNK_ID
    im_start_id, im_end_id, code_id, endcode_id = IM_START_ID, IM_END_ID, CODE_ID, ENDCODE_ID
    end_of_turn_id = IM_END_ID
    chat_template = CHATML_TEMPLATE

    def __init__(self, model_proto: bytes):
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        pieces = tuple(self._sp.id_to_piece(i) for i in range(min(len(SPECIAL_TOKENS), self._sp.get_piece_size())))
        if pieces != SPECIAL_TOKENS:
            # A foreign SentencePiece model would need its roles read from files it does not carry.
            raise ValueError(
                f"not a julian tokenizer: ids 0..7 are {pieces}, expected {SPECIAL_TOKENS}"
            )
        self._num_threads = os.cpu_count() or 1

    @classmethod
    def from_file(cls, path: str) -> SentencePieceTokenizer:
        """A .model file as train_tokenizer writes it."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer not found: {path!r} (expected a SentencePiece .model file, as "
                                    "tokenizer.py writes, a Hugging Face tokenizer.json or its folder)")
        with open(path, "rb") as f:
            model_bytes = f.read()
        try:
            return cls(model_bytes)
        except RuntimeError as e:  # SentencePiece cannot parse it: truncated, or not a model
            raise ValueError(f"{path!r} is not a SentencePiece model ({e}): expected "
                             "a .model file as tokenizer.py writes") from None

    @property
    def model_bytes(self) -> bytes:
        return self._proto

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return self._sp.encode(text, add_bos=bos, add_eos=eos)

    def encode_batch(
        self, texts: Sequence[str], bos: bool = False, eos: bool = False
    ) -> list[list[int]]:
        return self._sp.encode(list(texts), add_bos=bos, add_eos=eos, num_threads=self._num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        # Special ids carry no text (SentencePiece would print <unk> as " ⁇ ").
        return self._sp.decode([int(i) for i in ids if int(i) >= len(SPECIAL_TOKENS)])

    @property
    def document_prefix(self) -> list[int]:
        return [BOS_ID]

    def render_chat(
        self, messages: Sequence[dict], add_generation_prompt: bool = False
    ) -> list[int]:
        """ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message (no <s>).

        Control ids come from here and only here; role and content go through `encode`, so a
        "<|im_end|>" typed by a user becomes ordinary pieces. Each stretch of text between
        control tokens is encoded on its own, which is how Hugging Face tokenizes the string
        CHATML_TEMPLATE renders, and (no dummy prefix) it starts with exactly its own text, not
        an extra "▁". The newline after the role is the byte <0x0A>, which never merges, so
        the content's ids do not depend on the role.
        """
        check_messages(messages)
        ids: list[int] = []
        for message in messages:
            ids += [IM_START_ID, *self.encode(f"{message['role']}\n{message['content']}"), IM_END_ID,
                    *self.encode("\n")]
        if add_generation_prompt:
            ids += [IM_START_ID, *self.encode("assistant\n")]
        return ids

    def chat_ids(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> list[int]:
        """<s>, then ChatML: a conversation is a document, as in pretraining."""
        return [*self.document_prefix, *self.render_chat(messages, add_generation_prompt)]

    def chat_turns(self, messages: Sequence[dict]) -> tuple[list[int], list[tuple[int, int, int]]]:
        # ChatML renders message by message, so each turn's ids are its own rendering.
        check_messages(messages)
        header = self.render_chat([], add_generation_prompt=True)  # <|im_start|>assistant\n
        ids, spans = list(self.document_prefix), []
        for message in messages:
            turn = self.render_chat([message])
            if message["role"] == "assistant":
                # The header is a prefix of the turn's ids: "\n" is a byte piece that never merges.
                assert turn[: len(header)] == header, "role header merged with the content"
                stop = turn.index(IM_END_ID, len(header)) + 1  # the first: content cannot produce the id
                spans.append((len(ids) + len(header), len(ids) + stop, len(ids) + len(turn)))
            ids += turn
        return ids, spans



def language_stats(tok: Tokenizer, specs: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per language (language_of each [lang=]path), the usual measures of what a tokenizer costs
    a language: tokens per word (words split at whitespace) and UTF-8 bytes per token, with the
    counts behind them. Each line is encoded on its own, as training and evaluation see text."""
    counts: dict[str, list[int]] = {}
    for spec in specs:
        label, path = language_of(spec)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--stats file {path!r} does not exist")
        lines = [line for line in _lines_of_files([path]) if line]
        tokens = sum(len(ids) for ids in tok.encode_batch(lines))
        words = sum(len(line.split()) for line in lines)
        n_bytes = sum(len(line.encode("utf-8")) for line in lines)
        total = counts.setdefault(label, [0, 0, 0, 0])
        for i, n in enumerate((len(lines), words, n_bytes, tokens)):
            total[i] += n
    return {label: {"lines": lines, "words": words, "bytes": n_bytes, "tokens": tokens,
                    "tokens_per_word": tokens / max(words, 1), "bytes_per_token": n_bytes / max(tokens, 1)}
            for label, (lines, words, n_bytes, tokens) in counts.items()}


def stats_table(stats: dict[str, dict[str, float]]) -> str:
    lines = ["| language | tokens/word | bytes/token | words | bytes | tokens |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {k} | {v['tokens_per_word']:.3f} | {v['bytes_per_token']:.3f} | {v['words']} | "
              f"{v['bytes']} | {v['tokens']} |" for k, v in stats.items()]
    return "\n".join(lines)


# --- CLI --------------------------------------------------------------------------------------


def define_flags() -> None:
    # Defined only when run as a script: importing tokenizer.py must not add flags that could
    # collide with train.py's (e.g. --vocab_size).
    from absl import flags

    flags.DEFINE_list("input", None, "Comma-separated UTF-8 text files, one paragraph per line.")
    flags.DEFINE_string("model_prefix", None, "Writes PREFIX.model and PREFIX.vocab.")
    flags.DEFINE_integer("vocab_size", 50_000, "Vocabulary size, special and byte pieces included.")
    flags.DEFINE_float("character_coverage", 0.9999, "Share of characters that get their own "
                       "piece; the rarest others are spelled with byte pieces.")
    flags.DEFINE_integer("max_sentences", 2_000_000, "Lines sampled at random from the input "
                         "to train on (bounds memory and time).")
    flags.DEFINE_bool("verbose", False, "Show SentencePiece's training log.")
    flags.DEFINE_string("model", None, "With --stats: a trained PREFIX.model to measure.")
    flags.DEFINE_list("stats", [], "Instead of training: tokens per word and bytes per token of "
                      "--model on these text files, per language ([lang=]path; en_*.txt is en).")


def main(argv: Sequence[str]) -> None:
    from absl import flags

    del argv
    FLAGS = flags.FLAGS
    if FLAGS.stats or FLAGS.model:
        if not (FLAGS.stats and FLAGS.model):
            raise ValueError("--stats and --model go together: the files to measure and the model")
        print(stats_table(language_stats(SentencePieceTokenizer.from_file(FLAGS.model), FLAGS.stats)))
        return
    for name in ("input", "model_prefix"):
        if not FLAGS[name].value:
            raise ValueError(f"--{name} is required to train (or --model and --stats to measure)")
    missing = [p for p in FLAGS.input if not os.path.exists(p)]
    if missing:
        raise ValueError(f"--input: {', '.join(map(repr, missing))} not found (expected UTF-8 text files, "
                         "comma-separated)")
    start = time.time()
    path = train_tokenizer(
        FLAGS.input, FLAGS.model_prefix, vocab_size=FLAGS.vocab_size,
        character_coverage=FLAGS.character_coverage, max_sentences=FLAGS.max_sentences,
        verbose=FLAGS.verbose,
    )
    tok = SentencePieceTokenizer.from_file(path)
    print(f"wrote {path} ({tok.vocab_size} pieces) in {time.time() - start:.1f}s")
    sample = "Le chat dort.\nThe cat sleeps, 42 times."
    print(f"sample: {sample!r} -> {[tok.id_to_piece(i) for i in tok.encode(sample)]}")
    # Compression on a bounded prefix of the input, so the summary stays quick on a big corpus.
    lines = [line for _, line in zip(range(10_000), _lines_of_files(FLAGS.input))]
    chars = sum(len(line) for line in lines)
    tokens = sum(len(ids) for ids in tok.encode_batch(lines))
    print(f"tokens/char on the first {len(lines)} input lines: {tokens / max(chars, 1):.3f}")


if __name__ == "__main__":
    import cli

    define_flags()
    cli.run(main)
