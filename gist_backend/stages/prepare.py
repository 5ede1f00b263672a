"""Stage 1: read and tokenise the pool and the validation files, with ids unique within each split and a bad-record report."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl

from ..engine.records import DataError, Record, load_records, render_text
from ..engine.tokenize import IGNORE_INDEX, TokenizedExample, tokenize_records
from ..runs.files import atomic_path


@dataclass
class Prepared:
    """Tokenised examples and their tables, the skipped records, and ids that had to be renamed."""

    train: list[TokenizedExample]
    val: list[TokenizedExample]
    train_table: pl.DataFrame
    val_table: pl.DataFrame
    bad: list[dict] = field(default_factory=list)
    renamed: list[dict] = field(default_factory=list)  # {"split", "file", "line", "id", "new_id"}


def load_split(paths: Sequence[str], split: str, used: set[str]) -> tuple[list[Record], list[dict], list[dict]]:
    """Records of several files with ids unique among ``used`` (updated); (records, bad rows, renames).

    An id repeated inside one file is replaced by the record's content hash (``assign_ids``); an id already
    taken by an earlier file gets "-2", "-3", … appended, in file order. Both are reported: every later
    command then finds each id exactly once.
    """
    records: list[Record] = []
    bad: list[dict] = []
    renamed: list[dict] = []
    for path in paths:
        recs, bads = load_records(path)
        bad += [{"split": split, "file": b.file, "line": b.line, "reason": b.reason} for b in bads]
        for rec in recs:
            if rec.given_id is not None:
                renamed.append({"split": split, "file": rec.file, "line": rec.line, "id": rec.given_id, "new_id": rec.id})
            new_id, k = rec.id, 1
            while new_id in used:
                k += 1
                new_id = f"{rec.id}-{k}"
            if new_id != rec.id:
                renamed.append({"split": split, "file": rec.file, "line": rec.line, "id": rec.id, "new_id": new_id})
                rec = Record(new_id, rec.source, rec.task, rec.messages, rec.raw, rec.file, rec.line)
            used.add(new_id)
            records.append(rec)
    return records, bad, renamed


def example_table(records: Sequence[Record], examples: Sequence[TokenizedExample]) -> pl.DataFrame:
    """The Parquet table of usable rows (records that survived tokenisation, in file order)."""
    by_id = {r.id: r for r in records}
    rows = [by_id[e.id] for e in examples]
    return pl.DataFrame(
        {
            "row": np.arange(len(rows), dtype=np.int64),
            "id": [r.id for r in rows],
            "source": [r.source for r in rows],
            "task": [r.task for r in rows],
            "n_tokens": [len(e.input_ids) for e in examples],
            "n_response_tokens": [sum(label != IGNORE_INDEX for label in e.labels) for e in examples],
            "text": [render_text(r) for r in rows],
            "raw": [r.raw for r in rows],
            "file": [r.file for r in rows],
            "line": [r.line for r in rows],
        },
        schema_overrides={"id": pl.String, "source": pl.String, "task": pl.String, "text": pl.String, "raw": pl.String, "file": pl.String},
    )


def prepare(train_files: Sequence[str], val_files: Sequence[str], tokenizer, max_len: int) -> Prepared:
    """Load and tokenise both splits; DataError (naming the files) when either has no usable example."""
    train_records, bad, renamed = load_split(train_files, "train", set())
    val_records, val_bad, val_renamed = load_split(val_files, "val", set())
    bad += val_bad
    train_ex, train_tok_bad = tokenize_records(train_records, tokenizer, max_len)
    val_ex, val_tok_bad = tokenize_records(val_records, tokenizer, max_len)
    bad += [{"split": "train", "file": b.file, "line": b.line, "reason": b.reason} for b in train_tok_bad]
    bad += [{"split": "val", "file": b.file, "line": b.line, "reason": b.reason} for b in val_tok_bad]
    if not train_ex:
        raise DataError(f"no usable training example in {', '.join(train_files)} after tokenisation (see the run's bad_records.jsonl)")
    if not val_ex:
        raise DataError(f"no usable validation example in {', '.join(val_files)} after tokenisation (see the run's bad_records.jsonl)")
    return Prepared(train_ex, val_ex, example_table(train_records, train_ex), example_table(val_records, val_ex), bad, renamed + val_renamed)


def prepare_targets(val_files: Sequence[str], tokenizer, max_len: int) -> tuple[list[TokenizedExample], pl.DataFrame, list[dict]]:
    """One more target's validation records, tokenised: (examples, table, bad rows); DataError when none is usable."""
    records, bad, _ = load_split(val_files, "val", set())
    examples, tok_bad = tokenize_records(records, tokenizer, max_len)
    bad += [{"split": "val", "file": b.file, "line": b.line, "reason": b.reason} for b in tok_bad]
    if not examples:
        raise DataError(f"no usable validation example in {', '.join(val_files)} after tokenisation")
    return examples, example_table(records, examples), bad


def write_bad_records(path: Path, bad: list[dict]) -> None:
    """The skipped-record report, one JSON object per line."""
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(b, ensure_ascii=False) + "\n" for b in bad))
