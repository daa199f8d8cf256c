"""Which tokenizer a path or a checkpoint holds, opened behind tokenizer.py's one interface: ours
(a SentencePiece .model, `SentencePieceTokenizer`) or a Hugging Face one (a tokenizer.json with
the tokenizer_config.json, special_tokens_map.json and chat_template.jinja beside it,
hf_tokenizer.py's `HFTokenizer`).

Its own file because it needs both kinds: hf_tokenizer.py builds on tokenizer.py's interface, so
the choice between them cannot live in tokenizer.py without an import circle.
"""

from __future__ import annotations

import os

from hf_tokenizer import HFTokenizer
from tokenizer import SentencePieceTokenizer, Tokenizer


def open_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A SentencePiece .model, a Hugging Face tokenizer.json, or a folder holding either
    (tokenizer.json first)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return HFTokenizer.from_folder(path)
        if os.path.isfile(os.path.join(path, "tokenizer.model")):
            return SentencePieceTokenizer.from_file(os.path.join(path, "tokenizer.model"))
        raise FileNotFoundError(f"{path!r} holds neither tokenizer.json nor tokenizer.model: expected a "
                                "Hugging Face tokenizer folder")
    if path.endswith(".json") and os.path.isfile(path):
        return HFTokenizer.from_folder(os.path.dirname(path) or ".", os.path.basename(path))
    return SentencePieceTokenizer.from_file(path)


def tokenizer_from_bytes(data: bytes) -> Tokenizer:
    """The inverse of `Tokenizer.model_bytes` (what a checkpoint stores); also a bare tokenizer.json's bytes."""
    if bytes(data[:1]) == b"{":
        return HFTokenizer.from_bundle(bytes(data))
    return SentencePieceTokenizer(data)
