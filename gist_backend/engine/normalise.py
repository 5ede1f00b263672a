"""Normalise a raw record (chat, ShareGPT, Alpaca, prompt/completion) to validated chat messages, and give it an id.

Every reason a record cannot be used is raised as ``Unusable`` with a sentence the curator reads in the
run's bad-record report.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any, Sequence

_ROLES = {
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant", "bot": "assistant",
    "system": "system",
}  # fmt: skip


class Unusable(Exception):
    """This record cannot be used, for the reason in args[0]."""


def check_unicode(row: dict, raw: str) -> None:
    """Skip a record holding an unpaired surrogate (a '\\ud800' escape): it is not Unicode text and cannot be stored."""
    try:
        raw.encode("utf-8")
        if "\\u" in raw:  # only escapes can smuggle a lone surrogate into JSONL text
            json.dumps(row, ensure_ascii=False, default=str).encode("utf-8")
    except UnicodeEncodeError as e:
        bad = e.object[e.start : e.end]
        raise Unusable(f"invalid Unicode: unpaired surrogate {bad.encode('unicode_escape').decode()} (not a character)") from None


def type_name(v: Any) -> str:
    return {type(None): "null", dict: "object", list: "list"}.get(type(v), type(v).__name__)


def _str_field(row: dict, key: str, where: str | None = None) -> str:
    v = row[key]
    if isinstance(v, str):
        return v
    raise Unusable(f"field '{where or key}' must be a string, got {type_name(v)}")


def text_field(row: dict, keys: Sequence[str]) -> str | None:
    for k in keys:
        v = row.get(k)
        if v is not None and v != "":
            return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)
    return None


def normalise(row: dict) -> tuple[dict, ...]:
    """Turn a chat/ShareGPT/Alpaca/prompt-completion record into validated chat messages."""
    # null counts as absent throughout: Parquet/HF rows fill missing columns with None.
    if row.get("messages") is not None:
        msgs = _chat(row["messages"], "messages")
    elif row.get("conversations") is not None:
        msgs = _chat(row["conversations"], "conversations")
    elif row.get("instruction") is not None or row.get("output") is not None:
        msgs = _alpaca(row)
    elif row.get("prompt") is not None or row.get("completion") is not None:
        msgs = _prompt_completion(row)
    else:
        found = ", ".join(sorted(k for k, v in row.items() if v is not None)[:8]) or "none"
        raise Unusable(
            "unrecognised record: expected 'messages', 'conversations', 'instruction'/'output' "
            f"or 'prompt'/'completion' (fields found: {found})"
        )
    if not msgs:
        raise Unusable("no messages")
    if msgs[-1]["role"] != "assistant":
        raise Unusable("no response: last message is not from the assistant")
    if not msgs[-1]["content"].strip():
        raise Unusable("no response: the last assistant message is empty")
    if msgs[0]["role"] == "assistant":
        raise Unusable("no prompt: the conversation starts with an assistant message")
    return tuple(msgs)


def _chat(value: Any, key: str) -> list[dict]:
    if not isinstance(value, list):
        raise Unusable(f"field '{key}' must be a list, got {type_name(value)}")
    out = []
    for i, m in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise Unusable(f"field '{where}' must be an object, got {type_name(m)}")
        role_key = "role" if m.get("role") is not None else "from"
        role = m.get(role_key)
        if role is None:
            raise Unusable(f"field '{where}' has no 'role' (or 'from')")
        if not isinstance(role, str) or role.lower() not in _ROLES:
            raise Unusable(f"field '{where}.{role_key}' must be user, assistant or system, got {role!r}")
        content_key = "content" if m.get("content") is not None else "value"
        content = m.get(content_key)
        if content is None:
            raise Unusable(f"field '{where}' has no 'content' (or 'value')")
        out.append({"role": _ROLES[role.lower()], "content": _content(content, f"{where}.{content_key}")})
    return out


def _content(v: Any, where: str) -> str:
    """Message text; OpenAI-style lists of {'type': 'text', 'text': …} parts are joined."""
    if isinstance(v, str):
        return v
    if isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in v):
        return "".join(p["text"] for p in v)
    raise Unusable(f"field '{where}' must be a string, got {type_name(v)}")


def _alpaca(row: dict) -> list[dict]:
    if row.get("instruction") is None:
        raise Unusable("missing field 'instruction'")
    if row.get("output") is None:
        raise Unusable("no response: missing field 'output'")
    instruction = _str_field(row, "instruction")
    extra = _str_field(row, "input") if row.get("input") is not None else ""
    output = _str_field(row, "output")
    prompt = "\n\n".join(part for part in (instruction, extra) if part)
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _prompt_completion(row: dict) -> list[dict]:
    if row.get("prompt") is None:
        raise Unusable("missing field 'prompt'")
    if row.get("completion") is None:
        raise Unusable("no response: missing field 'completion'")
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, list) and isinstance(completion, list):  # TRL conversational prompt/completion
        return _chat(prompt, "prompt") + _chat(completion, "completion")
    return [
        {"role": "user", "content": _str_field(row, "prompt")},
        {"role": "assistant", "content": _str_field(row, "completion")},
    ]


def _content_hash(row: dict) -> str:
    """16 hex of sha256 of the record's canonical JSON (sorted keys, null fields dropped, so formats agree)."""
    canon = json.dumps(
        {k: v for k, v in row.items() if v is not None},
        sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str,
    )
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()[:16]


def given_id(row: dict) -> str | None:
    """The record's own id as a string, or None when it has none (missing or blank)."""
    return None if row.get("id") is None or str(row.get("id")).strip() == "" else _id_str(row["id"])


def assign_ids(rows: list[dict]) -> list[str]:
    """Given id where present and unique among usable records, else content hash with -2, -3 … for repeats."""
    given = [given_id(r) for r in rows]
    counts = Counter(g for g in given if g is not None)
    ids: list[str | None] = [g if g is not None and counts[g] == 1 else None for g in given]
    used = {i for i in ids if i is not None}
    for k, row in enumerate(rows):
        if ids[k] is not None:
            continue
        h = _content_hash(row)
        cand, n = h, 1
        while cand in used:
            n += 1
            cand = f"{h}-{n}"
        used.add(cand)
        ids[k] = cand
    return ids  # type: ignore[return-value]


def _id_str(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)

