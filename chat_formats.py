"""Conversation records as users have them, read into ChatML message lists (sft.py, dpo.py).

Inputs are JSON arrays or JSONL files, local or gs://. Each record is one conversation (seed
tasks: one per instance); `--format=auto` recognises the shape of each record by its keys:

    messages    {"messages": [{"role", "content"}, ...]}             OpenAI style
    sharegpt    {"conversations": [{"from", "value"}, ...]}         roles human / gpt / system
    vigogne     {"conversation": [{"role", "content"}, ...]}        roles UTILISATEUR / ASSISTANT
    alpaca      {"instruction", "input", "output"}                   user = instruction, blank line, input
    dolly       {"instruction", "context", "response"}               likewise with the context
    seed_tasks  {"instruction", "instances": [{"input", "output"}]}  Alpaca's and vigogne's seeds

Roles are matched case-insensitively (ROLES). A record's "system" string, or a leading system
message, is its system prompt; otherwise the default ("You are a helpful assistant."). Trailing
messages after the last assistant turn carry no loss and are dropped. A record that is not a
usable conversation (invalid JSON, unknown shape or role, empty content, no assistant turn) is
counted and skipped; if a file's share of such records exceeds `max_bad_fraction` (0: any), the
load fails with the file, the line and the reason of the first ones.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import re
from collections.abc import Callable, Iterator

import storage
from tokenizer import DEFAULT_SYSTEM

# format -> (key of the message list, key of a message's role, key of its text)
MESSAGE_LISTS = {"messages": ("messages", "role", "content"),
                 "sharegpt": ("conversations", "from", "value"),
                 "vigogne": ("conversation", "role", "content")}
# format -> (key of the optional text appended to the instruction, key of the answer)
INSTRUCTIONS = {"alpaca": ("input", "output"), "dolly": ("context", "response")}
FORMATS = ("auto", *MESSAGE_LISTS, *INSTRUCTIONS, "seed_tasks")
# Role names found in the wild (casefolded) -> ChatML role.
ROLES = {"system": "system", "user": "user", "human": "user", "utilisateur": "user",
         "assistant": "assistant", "gpt": "assistant"}


class BadRecord(ValueError):
    """A record that is not a usable conversation: counted and skipped, within limits."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


# --------------------------------------------------------------------------------------------
# Reading records.


def read_text(path: str) -> str:
    """A whole UTF-8 file, local or gs:// (storage.read_bytes: GCS reads retried)."""
    try:
        raw = storage.read_bytes(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"data file {path!r} does not exist") from None
    try:
        return raw.decode("utf-8-sig")  # -sig: a byte-order mark is not JSON
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


_SPACE = re.compile(r"\s*")


def iter_records(path: str, text: str) -> Iterator[tuple[str, object]]:
    """(where, record) for a JSON array or a JSONL text; `where` is "line 7" or, in an array,
    "line 7, record 3". An unparsable JSONL line yields a BadRecord in place of its record; a
    broken JSON array raises ValueError (no way to resync)."""
    if not text.lstrip().startswith("["):
        # split("\n"), not splitlines(): JSON strings may hold U+2028 and other line separators.
        for number, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    record = BadRecord("invalid JSON", f"{e.msg.removesuffix(' at')} at column {e.colno}")
                yield f"line {number}", record
        return
    decoder, pos, line, counted = json.JSONDecoder(), text.index("[") + 1, 1, 0
    for index in itertools.count():
        pos = _SPACE.match(text, pos).end()
        if pos < len(text) and text[pos] == "]":
            return
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {e.lineno}: invalid JSON array: {e.msg}") from None
        yield f"line {line}, record {index}", record
        pos = _SPACE.match(text, pos).end()
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos >= len(text) or text[pos] != "]":
            where = line + text.count("\n", counted, pos)
            raise ValueError(f"{path}: line {where}: invalid JSON array: expected ',' or ']'")


# --------------------------------------------------------------------------------------------
# Records to conversations.


def detect_format(record: dict) -> str:
    for name, (key, _, _) in MESSAGE_LISTS.items():
        if key in record:
            return name
    for name, key in (("seed_tasks", "instances"), ("dolly", "response"), ("alpaca", "output")):
        if key in record:
            return name
    raise BadRecord("wrong shape", f"keys {sorted(record)}; expected one of messages, "
                    "conversations, conversation, instances, response or output")


def text_field(record: dict, key: str, required: bool) -> str:
    if required and key not in record:
        raise BadRecord("wrong shape", f"no {key!r} in keys {sorted(record)}")
    value = record.get(key, "")
    if not isinstance(value, str):
        raise BadRecord("wrong shape", f"{key!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise BadRecord("empty content", f"{key!r} is empty")
    return value


def _instruction(instruction: str, extra: str) -> str:
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def message_list(record: dict, fmt: str) -> list[dict]:
    list_key, role_key, text_key = MESSAGE_LISTS[fmt]
    turns = record.get(list_key)
    if not isinstance(turns, list) or not turns:
        raise BadRecord("wrong shape", f"{list_key!r} must be a non-empty list of messages")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRecord("wrong shape", f"message {i} must be an object, got {type(turn).__name__}")
        name = turn.get(role_key)
        role = ROLES.get(name.casefold()) if isinstance(name, str) else None
        if role is None:
            raise BadRecord("unknown role", f"message {i} has {role_key}={name!r}; expected one of "
                            f"{', '.join(ROLES)} (any case)")
        if role == "system" and i > 0:
            raise BadRecord("misplaced system", f"message {i} is a system message; expected only first")
        messages.append({"role": role, "content": text_field(turn, text_key, required=True)})
    return messages


def to_conversations(record: object, fmt: str = "auto", default_system: str = DEFAULT_SYSTEM
                     ) -> list[list[dict]]:
    """A record's conversations as ChatML messages [{role, content}], the system message first.

    Raises BadRecord if the record is not a usable conversation in format `fmt` (FORMATS).
    """
    if not isinstance(record, dict):
        raise BadRecord("wrong shape", f"expected a JSON object, got {type(record).__name__}")
    fmt = detect_format(record) if fmt == "auto" else fmt
    system = text_field(record, "system", required=False) or default_system
    if fmt in MESSAGE_LISTS:
        conversations = [message_list(record, fmt)]
    elif fmt == "seed_tasks":
        instruction = text_field(record, "instruction", required=True)
        instances = record.get("instances")
        if not isinstance(instances, list) or not instances:
            raise BadRecord("wrong shape", "'instances' must be a non-empty list")
        conversations = []
        for instance in instances:
            if not isinstance(instance, dict):
                raise BadRecord("wrong shape", f"an instance must be an object, got {type(instance).__name__}")
            user = _instruction(instruction, text_field(instance, "input", required=False))
            conversations.append([{"role": "user", "content": user}, {
                "role": "assistant", "content": text_field(instance, "output", required=True)}])
    else:
        extra_key, answer_key = INSTRUCTIONS[fmt]
        user = _instruction(text_field(record, "instruction", required=True),
                            text_field(record, extra_key, required=False))
        conversations = [[{"role": "user", "content": user},
                          {"role": "assistant", "content": text_field(record, answer_key, required=True)}]]
    result = []
    for messages in conversations:
        if messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}, *messages]
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise BadRecord("no assistant turn")
        result.append(messages[: last + 1])
    return result


@dataclasses.dataclass
class FileStats:
    """What loading one file did, for the summary table and for errors."""
    path: str
    records: int = 0
    conversations: int = 0
    bad: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    first_bad: list[str] = dataclasses.field(default_factory=list)
    truncated: int = 0
    dropped: int = 0
    validation: int = 0
    mixed: int = 0  # conversations in the training mix, repeats included
    supervised_tokens: int = 0  # in the training mix

    def to_dict(self) -> dict:
        """The stats as JSON (dataclasses.asdict would turn the Counter's items into tuple keys)."""
        return {**dataclasses.asdict(self), "bad": dict(self.bad)}

    @classmethod
    def from_dict(cls, values: dict) -> FileStats:
        """The inverse of to_dict (stats kept with prepared rows)."""
        return cls(**{**values, "bad": collections.Counter(values["bad"])})


def load_records(path: str, convert: Callable[[object], list], max_bad_fraction: float, what: str
                 ) -> tuple[list, FileStats]:
    """`convert`'s items (conversations, pairs) from every record of one file, and its stats. Bad
    records (BadRecord) are counted and skipped unless more than `max_bad_fraction` of the
    records are bad: then ValueError names the file, the first bad lines and their reasons."""
    stats, items = FileStats(path), []
    for where, record in iter_records(path, read_text(path)):
        stats.records += 1
        try:
            if isinstance(record, BadRecord):
                raise record
            items += convert(record)
        except BadRecord as e:
            stats.bad[e.kind] += 1
            if len(stats.first_bad) < 5:
                stats.first_bad.append(f"{where}: {e}")
    if not stats.records:
        raise ValueError(f"{path}: no records; expected a JSON array or JSONL of {what}")
    bad = sum(stats.bad.values())
    if bad > max_bad_fraction * stats.records:
        first, reason = stats.first_bad[0].split(": ", 1)
        same = [more.split(": ", 1)[0] for more in stats.first_bad[1:] if more.split(": ", 1)[1] == reason]
        other = [more for more in stats.first_bad[1:] if more.split(": ", 1)[1] != reason]
        raise ValueError(f"{path}, {first}: {reason} ({bad} of {stats.records} records are bad, "
                         f"{bad / stats.records:.1%}, more than --max_bad_fraction={max_bad_fraction:g})"
                         + (f"; the same at {', '.join(same)}" if same else "") + "".join(f"; {o}" for o in other))
    stats.conversations = len(items)
    return items, stats


def load_conversations(path: str, fmt: str = "auto", max_bad_fraction: float = 0.0,
                       default_system: str = DEFAULT_SYSTEM) -> tuple[list[list[dict]], FileStats]:
    """All conversations of one file, and its stats (load_records)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return load_records(path, lambda record: to_conversations(record, fmt, default_system), max_bad_fraction,
                        "conversations")


def stats_table(stats: list[FileStats], items: str, cut: str, tokens: str, dropped_why: str = "") -> str:
    """One line per file and a total (read, bad, `items` kept, `cut`, dropped, held out, in the
    mix, `tokens` trained on), then the bad records' reasons and, when some were dropped,
    `dropped_why` (a count alone reads as lost data)."""
    header = ("file", "records", "bad", items, cut, "dropped", "validation", "in mix", tokens)
    lines = [(s.path, s.records, sum(s.bad.values()), s.conversations, s.truncated, s.dropped,
              s.validation, s.mixed, s.supervised_tokens) for s in stats]
    lines.append(("total", *(sum(line[k] for line in lines) for k in range(1, len(header)))))
    cells = [header, *[tuple(c if isinstance(c, str) else f"{c:,}" for c in line) for line in lines]]
    widths = [max(len(line[k]) for line in cells) for k in range(len(header))]
    text = "\n".join("  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in
                               enumerate(zip(line, widths))) for line in cells)
    reasons = collections.Counter()
    for s in stats:
        reasons.update(s.bad)
    if reasons:
        text += "\nbad records: " + ", ".join(f"{k} {v:,}" for k, v in reasons.most_common())
    if dropped_why and any(s.dropped for s in stats):
        text += f"\ndropped: {dropped_why}"
    return text


# --------------------------------------------------------------------------------------------
# Preference pairs (dpo.py).

# TRL's standard and conversational forms, HH-RLHF transcripts, UltraFeedback-binarized.
PAIR_FORMATS = ("auto", "standard", "conversational", "hh_rlhf", "ultrafeedback")
_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclasses.dataclass(frozen=True)
class Pair:
    """A prompt (ChatML messages, the system message first) and its two replies."""
    prompt: tuple[dict, ...]
    chosen: str
    rejected: str


def detect_pair_format(record: dict) -> str:
    if "chosen" not in record or "rejected" not in record:
        raise BadRecord("wrong shape", f"keys {sorted(record)}; expected chosen and rejected")
    if isinstance(record["chosen"], list):
        return "conversational" if isinstance(record.get("prompt"), list) else "ultrafeedback"
    return "standard" if "prompt" in record else "hh_rlhf"


def _transcript(text: str) -> list[dict]:
    """An HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as messages, texts stripped."""
    parts = _TURN.split(text if text.startswith("\n\n") else "\n\n" + text)
    if parts[0].strip() or len(parts) < 3:
        raise BadRecord("wrong shape", "expected a transcript of '\\n\\nHuman:' and '\\n\\nAssistant:' turns")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[name], "content": body.strip()} for name, body in zip(parts[1::2], parts[2::2])]


def _messages(value: object, key: str) -> list[dict]:
    return message_list({"messages": value}, "messages") if isinstance(value, list) else \
        [{"role": "user", "content": text_field({key: value}, key, required=True)}]


def _reply(messages: list[dict], key: str) -> str:
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise BadRecord("wrong shape", f"{key!r} must hold exactly one assistant message")
    return messages[0]["content"]


def to_pair(record: object, fmt: str = "auto", default_system: str = DEFAULT_SYSTEM) -> Pair:
    """The pair a record holds in format `fmt` (PAIR_FORMATS); BadRecord if it is not a usable pair."""
    if not isinstance(record, dict):
        raise BadRecord("wrong shape", f"expected a JSON object, got {type(record).__name__}")
    fmt = detect_pair_format(record) if fmt == "auto" else fmt
    if fmt == "standard":
        prompt = text_field(record, "prompt", required=True)
        chosen, rejected = (text_field(record, k, required=True) for k in ("chosen", "rejected"))
        if _TURN.search(prompt) and prompt.rstrip().endswith("Assistant:"):
            prompt_messages = _transcript(prompt.rstrip()[: -len("Assistant:")].rstrip())
            chosen, rejected = chosen.strip(), rejected.strip()
        else:
            prompt_messages = [{"role": "user", "content": prompt}]
    elif fmt == "conversational":
        prompt_messages = _messages(record.get("prompt"), "prompt")
        chosen, rejected = (_reply(_messages(record.get(k), k), k) for k in ("chosen", "rejected"))
    elif fmt == "hh_rlhf":
        sides = [_transcript(text_field(record, k, required=True)) for k in ("chosen", "rejected")]
        if any(side[-1]["role"] != "assistant" for side in sides):
            raise BadRecord("no assistant turn", "a transcript must end with an Assistant reply")
        if sides[0][:-1] != sides[1][:-1]:
            raise BadRecord("prompts differ", "chosen and rejected transcripts differ before the last reply")
        prompt_messages, chosen, rejected = sides[0][:-1], sides[0][-1]["content"], sides[1][-1]["content"]
    elif fmt == "ultrafeedback":
        sides = [_messages(record.get(k), k) for k in ("chosen", "rejected")]
        if any(side[-1]["role"] != "assistant" for side in sides):
            raise BadRecord("no assistant turn", "chosen and rejected must end with an assistant message")
        if sides[0][:-1] != sides[1][:-1]:
            raise BadRecord("prompts differ", "chosen and rejected differ before their last message")
        prompt_messages, chosen, rejected = sides[0][:-1], sides[0][-1]["content"], sides[1][-1]["content"]
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(PAIR_FORMATS)}")
    if not any(m["role"] == "user" for m in prompt_messages):
        raise BadRecord("no user turn", "the prompt holds no user message")
    if any(not text.strip() for text in (chosen, rejected)):
        raise BadRecord("empty content", "a reply is empty")
    if chosen == rejected:
        raise BadRecord("identical replies", "chosen and rejected are the same text")
    if prompt_messages[0]["role"] != "system":
        system = text_field(record, "system", required=False) or default_system
        prompt_messages = [{"role": "system", "content": system}, *prompt_messages]
    return Pair(tuple(prompt_messages), chosen, rejected)


def load_pairs(path: str, fmt: str = "auto", max_bad_fraction: float = 0.0,
               default_system: str = DEFAULT_SYSTEM) -> tuple[list[Pair], FileStats]:
    """All preference pairs of one file, and its stats (load_records)."""
    if fmt not in PAIR_FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(PAIR_FORMATS)}")
    return load_records(path, lambda record: [to_pair(record, fmt, default_system)], max_bad_fraction,
                        "preference pairs")
