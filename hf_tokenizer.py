"""A pretrained model's own Hugging Face tokenizer, behind tokenizer.py's interface (`HFTokenizer`),
and the export of either kind of tokenizer as a folder transformers loads (`save_hf_tokenizer`).

A model imported from Hugging Face (convert.py) brings its own tokenizer: `tokenizer.json` (the
`tokenizers` library; byte-level BPE for most Llama-family models), with `tokenizer_config.json`,
`special_tokens_map.json` and `chat_template.jinja` beside it. `HFTokenizer` reads the special
tokens by role from those files (bos may be absent, byte-level BPE has no unk), encodes as
transformers' AutoTokenizer does, keeps the files byte for byte (a checkpoint stores them:
`model_bytes`; `save_hf_tokenizer` writes them back), and renders chats with the model's own
template through jinja2, with transformers' settings and globals, so the ids are those of
transformers' `apply_chat_template`. Its chat is ChatML where the vocabulary has
<|im_start|>/<|im_end|> and the files carry no template. One difference from ours, as in
transformers: special-token strings inside a message are read as those tokens.

Callers open one through tokenizer_files.py (`open_tokenizer`, `tokenizer_from_bytes`), which picks
this kind for a tokenizer.json, its folder or its bytes.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from collections.abc import Iterable, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import tokenizers

from tokenizer import CHATML_TEMPLATE, CODE_ID, SPECIAL_TOKENS, Tokenizer, check_messages


# transformers' chat template environment (its chat_template_utils), which templates are written
# for: trim_blocks and lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson`
# that keeps non-ASCII text, and the {% generation %} block some templates mark replies with.
class _GenerationBlock(jinja2.ext.Extension):
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def compile_chat_template(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


# The files of a Hugging Face tokenizer that we keep, byte for byte (tokenizer.json is required).
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
_BUNDLE = "julian hugging face tokenizer"  # model_bytes of an HFTokenizer: JSON of its files
ROLES = ("bos", "eos", "pad", "unk")
# The named special tokens transformers gives a chat template (its special_tokens_map).
TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# For a bare tokenizer.json (no tokenizer_config.json): the usual names of each role.
_KNOWN = {"bos": ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"),
          "eos": ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>"),
          "pad": ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>")}
# What transformers' clean_up_tokenization does to decoded text, where tokenizer_config.json asks.
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _as_transformers_builds_it(backend: tokenizers.Tokenizer, config: dict, tokenizer_json: dict) -> None:
    """What transformers 5's AutoTokenizer changes in tokenizer.json's pipeline (so that our ids
    are its ids): a declared LlamaTokenizer that is not byte-level gets its own normalizer-free
    Metaspace, a GPT2Tokenizer its plain ByteLevel, and add_bos_token/add_eos_token in the config
    rewrite the post-processor. Every other class reads the file as it is."""
    declared = str(config.get("tokenizer_class") or "").removesuffix("Fast")
    parts = [tokenizer_json.get("pre_tokenizer") or {}, tokenizer_json.get("decoder") or {}]
    parts += [p for part in list(parts) for p in part.get("pretokenizers", part.get("decoders", []))]
    byte_level = any(part.get("type") == "ByteLevel" for part in parts)
    prefix_space = config.get("add_prefix_space")
    if declared == "LlamaTokenizer" and not byte_level:
        prefix_space = True if prefix_space is None else prefix_space
        scheme = ("always" if config.get("legacy", False) else "first") if prefix_space else "never"
        backend.normalizer = None
        backend.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme,
                                                                    split=False)
        backend.decoder = tokenizers.decoders.Sequence(
            [tokenizers.decoders.Replace("▁", " "), tokenizers.decoders.ByteFallback(), tokenizers.decoders.Fuse()]
            + ([tokenizers.decoders.Strip(" ", 1, 0)] if prefix_space else []))
    elif declared == "GPT2Tokenizer":
        backend.normalizer = None
        backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=bool(prefix_space))
        backend.decoder = tokenizers.decoders.ByteLevel()
    if "add_bos_token" in config or "add_eos_token" in config or backend.post_processor is None:
        ends = {}
        for role in ("bos", "eos"):
            token = config.get(f"{role}_token")
            token = token.get("content") if isinstance(token, dict) else token
            if config.get(f"add_{role}_token") and token is not None and backend.token_to_id(token) is not None:
                ends[role] = token
        single = " ".join([*ends.get("bos", "").split(), "$A", *ends.get("eos", "").split()])
        pair = " ".join([single, *(f"{ends['bos']}:1".split() if "bos" in ends else []), "$B:1",
                         *(f"{ends['eos']}:1".split() if "eos" in ends else [])])
        backend.post_processor = tokenizers.processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, backend.token_to_id(t)) for t in ends.values()])


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer (the `tokenizers` library's tokenizer.json), its roles read from
    tokenizer_config.json and special_tokens_map.json as transformers 5 reads them (a bare
    tokenizer.json: by their usual names), its chat format from chat_template.jinja or
    tokenizer_config.json's chat_template.

    `encode` reads special-token strings in text as text (as ours does: a document that quotes
    "<|endoftext|>" does not end there); the chat template's rendering is read as transformers'
    apply_chat_template reads it, special tokens included, so that its ids are transformers'.
    """

    def __init__(self, files: dict[str, str], where: str = "the Hugging Face tokenizer"):
        self._files = dict(sorted(files.items()))
        try:
            self._text = tokenizers.Tokenizer.from_str(files["tokenizer.json"])
            self._markup = tokenizers.Tokenizer.from_str(files["tokenizer.json"])
        except Exception as e:  # noqa: BLE001: the library raises plain Exceptions on a bad file
            raise ValueError(f"{where}/tokenizer.json: not a Hugging Face tokenizer "
                             f"({str(e).splitlines()[0]}); expected the tokenizers library's format") from None
        self._config = self._json("tokenizer_config.json", where)
        spec = json.loads(files["tokenizer.json"])  # once: Llama 3's is 9 MB
        for backend in (self._text, self._markup):
            _as_transformers_builds_it(backend, self._config, spec)
        self._text.encode_special_tokens = True
        special_map = self._json("special_tokens_map.json", where)
        self._special = {i for i, added in self._text.get_added_tokens_decoder().items() if added.special}
        with_special = self._text.encode("a", add_special_tokens=True).ids
        plain = self._text.encode("a", add_special_tokens=False).ids
        start = next((k for k in range(len(with_special)) if with_special[k:k + len(plain)] == plain), 0)
        self._prefix = with_special[:start]
        # As transformers 5 reads them: tokenizer_config.json, overridden by special_tokens_map.json
        # unless the config lists its added tokens itself (then the map is legacy and unread).
        declared = {**self._config, **({} if "added_tokens_decoder" in self._config else special_map)}
        self._strings: dict[str, str] = {}
        for key in TEMPLATE_TOKENS:
            value = declared.get(key)
            if isinstance(value, dict):  # an AddedToken: {"content": ..., "lstrip": ...}
                value = value.get("content")
            if value is None and key not in declared and key.removesuffix("_token") in ROLES:
                value = self._guess(key.removesuffix("_token"), spec)
            if value is not None:
                if self._text.token_to_id(value) is None:
                    raise ValueError(f"{where}: {key}={value!r} is not in tokenizer.json's vocabulary")
                self._strings[key] = value
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (
            self._text.token_to_id(self._strings[f"{r}_token"]) if f"{r}_token" in self._strings else None
            for r in ROLES)
        if self.eos_id is None:
            raise ValueError(f"{where}: no eos token: expected eos_token in tokenizer_config.json (or, for a "
                             f"bare tokenizer.json, one of {', '.join(_KNOWN['eos'])} in its vocabulary)")
        self.im_start_id, self.im_end_id, self.code_id, self.endcode_id = (
            self._text.token_to_id(s) for s in ("<|im_start|>", "<|im_end|>", "<|code|>", "<|endcode|>"))
        template = files.get("chat_template.jinja") or self._config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and self.im_start_id is not None and self.im_end_id is not None:
            template = CHATML_TEMPLATE
        self.chat_template = template
        # transformers 5 skips the clean-up for BPE models, which it would corrupt, unless forced.
        model_type = spec.get("model", {}).get("type")
        self._clean_up = bool(self._config.get("clean_up_tokenization_spaces")) and (
            model_type != "BPE" or bool(self._config.get(
                "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")))

    def _json(self, name: str, where: str) -> dict:
        try:
            value = json.loads(self._files.get(name, "{}"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}/{name}: line {e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(value, dict):
            raise ValueError(f"{where}/{name}: expected a JSON object, got {type(value).__name__}")
        return value

    def _guess(self, role: str, spec: dict) -> str | None:
        """A role's token in a bare tokenizer.json (`spec`, parsed): bos is what its post-processor
        puts before a text, unk its model's unk_token, else the usual names."""
        if role == "bos" and len(self._prefix) == 1:
            return self._text.id_to_token(self._prefix[0])
        if role == "unk":
            return spec.get("model", {}).get("unk_token")
        return next((name for name in _KNOWN[role] if self._text.token_to_id(name) is not None), None)

    @classmethod
    def from_folder(cls, folder: str, tokenizer_file: str = "tokenizer.json") -> HFTokenizer:
        files = {}
        for name in HF_FILES:
            path = os.path.join(folder, tokenizer_file if name == "tokenizer.json" else name)
            if os.path.isfile(path):
                try:
                    with open(path, encoding="utf-8", newline="") as f:
                        files[name] = f.read()
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if "tokenizer.json" not in files:
            raise FileNotFoundError(f"tokenizer not found: {os.path.join(folder, tokenizer_file)!r}")
        return cls(files, folder)

    @classmethod
    def from_bundle(cls, data: bytes) -> HFTokenizer:
        """From model_bytes, or from a bare tokenizer.json's bytes."""
        try:
            value = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"not a tokenizer: JSON that does not parse ({e})") from None
        if isinstance(value, dict) and value.get("format") == _BUNDLE:
            return cls(value["files"])
        return cls({"tokenizer.json": data.decode("utf-8")})

    @property
    def model_bytes(self) -> bytes:
        return json.dumps({"format": _BUNDLE, "files": self._files}, ensure_ascii=False).encode("utf-8")

    @property
    def files(self) -> dict[str, bytes]:
        """The original files, byte for byte (save_hf_tokenizer writes them)."""
        return {name: text.encode("utf-8") for name, text in self._files.items()}

    @property
    def vocab_size(self) -> int:
        return max(self._text.get_vocab(with_added_tokens=True).values()) + 1

    def id_to_piece(self, token_id: int) -> str:
        return self._text.id_to_token(token_id)

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        start, end = (self._prefix if bos else []), ([self.eos_id] if eos else [])
        return [[*start, *e.ids, *end] for e in self._text.encode_batch(list(texts), add_special_tokens=False)]

    def encode_as_transformers(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._markup.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int]) -> str:
        text = self._text.decode([int(i) for i in ids], skip_special_tokens=True)
        if self._clean_up:
            for before, after in _CLEAN_UP:
                text = text.replace(before, after)
        return text

    @property
    def document_prefix(self) -> list[int]:
        return list(self._prefix)

    def _render(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat format: its files carry no chat_template and its "
                             "vocabulary has no <|im_start|>/<|im_end|>")
        check_messages(messages)
        try:
            return compile_chat_template(self.chat_template).render(
                messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **self._strings)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"the chat template refuses this conversation: {e}") from None

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> list[int]:
        """The chat template's text, read as transformers' apply_chat_template reads it (special
        tokens in it are special; nothing added around it)."""
        return self._markup.encode(self._render(messages, add_generation_prompt), add_special_tokens=False).ids

    def chat_ids(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> list[int]:
        """The template's rendering: the template itself starts the document (Llama 3's writes
        {{ bos_token }}), as in transformers."""
        return self.render_chat(messages, add_generation_prompt)

    @functools.cached_property
    def end_of_turn_id(self) -> int:
        """The first special token the template puts after an assistant's reply (<|im_end|>,
        Llama 3's <|eot_id|>); eos where it puts none, or the tokenizer has no chat format."""
        if self.chat_template is None:
            return self.eos_id
        messages = [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}]
        try:
            ids, [(start, _, end)] = self._turns(messages, None)
        except ValueError:  # a template that refuses a bare user/assistant exchange
            return self.eos_id
        return next((t for t in ids[start:end] if t in self._special), self.eos_id)

    def chat_turns(self, messages: Sequence[dict]) -> tuple[list[int], list[tuple[int, int, int]]]:
        """By rendering the conversation prefix by prefix: an assistant turn is what rendering it
        adds to the conversation before it with the generation prompt, up to the last
        end-of-turn token it holds."""
        return self._turns(messages, self.end_of_turn_id)

    def _turns(self, messages: Sequence[dict], end_of_turn: int | None
               ) -> tuple[list[int], list[tuple[int, int, int]]]:
        replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        texts = [self._render(messages, False)]
        for i in replies:
            texts += [self._render(messages[:i], True), self._render(messages[: i + 1], False)]
        encoded = [e.ids for e in self._markup.encode_batch(texts, add_special_tokens=False)]
        ids, spans = encoded[0], []
        for k, i in enumerate(replies):
            before, through = encoded[1 + 2 * k], encoded[2 + 2 * k]
            if ids[: len(through)] != through:
                raise ValueError(f"message {i}: the chat template renders this turn differently once later "
                                 "messages follow; cannot find its tokens in the conversation")
            start = next((n for n, (a, b) in enumerate(zip(before, through)) if a != b), min(len(before), len(through)))
            ends = [n for n in range(start, len(through)) if through[n] == end_of_turn]
            spans.append((start, ends[-1] + 1 if ends else len(through), len(through)))
        return ids, spans


def save_hf_tokenizer(tok: Tokenizer, out_dir: str | os.PathLike, chat_template: str = CHATML_TEMPLATE) -> None:
    """Writes a folder that `transformers.AutoTokenizer.from_pretrained` loads with the same ids
    as `tok`. A Hugging Face tokenizer's own files are written back byte for byte (its chat
    template with them; `chat_template` is for ours).

    Ours becomes a LlamaTokenizer (transformers 5; needs sentencepiece and protobuf to convert).

    add_prefix_space=False matches our model (no dummy prefix); legacy=False is the modern
    Llama behaviour. HF, unlike us, turns special-token strings found in text into their ids
    (that is how its chat template works); pass split_special_tokens=True to encode text as
    text.
    """
    os.makedirs(out_dir, exist_ok=True)
    if isinstance(tok, HFTokenizer):
        for name, content in tok.files.items():
            with open(os.path.join(out_dir, name), "wb") as f:
                f.write(content)
        return
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(tok.model_bytes)
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    extra = list(SPECIAL_TOKENS[CODE_ID:])
    config = {
        "tokenizer_class": "LlamaTokenizer",
        **special,
        "additional_special_tokens": extra,
        "add_bos_token": True,  # as LLaMA: hf(text) starts with <s>
        "add_eos_token": False,
        "add_prefix_space": False,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": chat_template,
    }
    special_map = {**special, "additional_special_tokens": extra}  # read by older transformers
    files = {"tokenizer_config.json": config, "special_tokens_map.json": special_map}
    for name, content in files.items():
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, ensure_ascii=False)
            f.write("\n")
