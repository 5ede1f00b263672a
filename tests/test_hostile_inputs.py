"""Hostile inputs: a corpus of broken, odd and oversized records, built in the test.

Each bad record is reported (file, line, reason) and skipped; each good record survives untouched:
its exported line is byte-identical to its input line (JSONL input; a UTF-8 BOM and the line ending
are not part of the record). Whole files that cannot be used give a DataError naming them. Counts of
the last full run are in tests/RELIABILITY.md.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from gist_backend.compute import ComputeConfig, compute
from gist_backend.engine.records import DataError, load_records
from gist_backend.engine.tokenize import tokenize_records
from gist_backend.runs import open_run
from gist_backend.curation.scoring import scores
from gist_backend.curation import export_jsonl, select

MAX_LEN = 96
TEN_MB = 10 * 2**20


def chat(user: str, assistant: str, **extra) -> dict:
    return {**extra, "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def line(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


# (line bytes, None for a good record or a substring of the reason it is skipped)
CORPUS: list[tuple[bytes, str | None]] = [
    # ---- good records, every accepted format mixed in one file
    (b"\xef\xbb\xbf" + line(chat("What is 1 plus 2?", "1 plus 2 is 3.", id="bom-first", dataset="a")), None),
    (line(chat("What is 2 plus 3?", "2 plus 3 is 5.", id="chat-1", dataset="a")), None),
    (line({"instruction": "Mix color 1 with color 2.", "input": "", "output": "Mixing 1 and 2 gives shade 3."}), None),
    (line({"instruction": "Name a river.", "input": "country 4", "output": "River 5 flows through country 4."}), None),
    (line({"prompt": "How many legs does animal 3 have?", "completion": "Animal 3 has 4 legs."}), None),
    (line({"conversations": [{"from": "human", "value": "What is 4 plus 4?"}, {"from": "gpt", "value": "8."}]}), None),
    (line({"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello."}]}), None),
    (line({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Sum 1 2"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "3"}]}]}), None),  # fmt: skip
    # ---- unusual Unicode and control characters (escaped or raw, all valid JSON)
    (line(chat("Emoji 😀👩‍👩‍👧", "Combining e\u0301 vs é, CJK 漢字, Thai ภาษา.")), None),
    (line(chat("RTL \u202eevil\u202c, zero-width\u200b\u200d\ufeff", "noncharacter \uffff, private use \ue000, tag \U000e0041")), None),
    (line(chat("raw line separators \u2028 and \u2029 inside a string", "fine\u2028too")), None),
    (b'{"prompt": "escaped NUL \\u0000 BEL \\u0007 ESC \\u001b", "completion": "and a surrogate pair \\ud83d\\ude00"}', None),
    (line(chat("special-token text <|assistant|> <|end|> <|endoftext|> in content", "<|user|> also here")), None),
    (b'{"prompt": "trailing whitespace after the object", "completion": "kept verbatim"}   \t', None),
    (b'{"prompt": "CRLF line ending", "completion": "the \\r is not part of the record"}\r', None),
    (b'{"prompt": "NaN is accepted by Python", "completion": "x", "score": NaN, "big": 1e999}', None),
    # ---- ids: duplicates, odd types (all kept; duplicates get content-hash ids)
    (line(chat("dup A", "first of two records with the same id", id="dup")), None),
    (line(chat("dup B", "second of two records with the same id", id="dup")), None),
    (line(chat("twin", "identical line, twice", id="twin")), None),
    (line(chat("twin", "identical line, twice", id="twin")), None),
    (line(chat("int id", "7", id=7)), None),
    (line(chat("object id", "x", id={"a": [1, 2]})), None),
    (line(chat("odd id", "x", id="../../etc/passwd\u202e\n")), None),
    # ---- oversized: a 10 MB response (kept, truncated to max_len tokens) and a very long token sequence
    (line(chat("Say it many times.", "word " * (TEN_MB // 5), id="huge-response")), None),
    (line(chat("Count.", " ".join(str(i) for i in range(60_000)), id="long-tokens")), None),
    # ---- bad: not JSON
    (b'{"messages": [', "invalid JSON"),
    (b'{"prompt": "a", "completion": "b",}', "invalid JSON"),
    (b"not json at all", "invalid JSON"),
    (b'{"prompt": "raw NUL \x00 inside", "completion": "b"}', "invalid JSON"),
    (b'{"prompt": "raw control \x07", "completion": "b"}', "invalid JSON"),
    (b'{"prompt": "\xff\xfe latin-1 bytes", "completion": "b"}', "not UTF-8"),
    (b'{"prompt": "\xed\xa0\x80 encoded surrogate", "completion": "b"}', "not UTF-8"),
    (b"[" * 100_000, "nested too deeply"),
    (b'{"id": 1' + b"0" * 5000 + b', "prompt": "a", "completion": "b"}', "invalid JSON"),
    (b'{"prompt": "a"} {"prompt": "b"}', "invalid JSON"),
    (b'{"prompt": "CR\rmid-line", "completion": "b"}', "invalid JSON"),
    # ---- bad: Unicode that is not text
    (b'{"prompt": "lone surrogate \\ud800", "completion": "b"}', "unpaired surrogate"),
    (b'{"prompt": "a", "completion": "b", "meta": {"note": "\\udfff"}}', "unpaired surrogate"),
    # ---- bad: wrong types
    (b"[1, 2]", "must be a JSON object"),
    (b"42", "must be a JSON object"),
    (b'"a string"', "must be a JSON object"),
    (b"null", "must be a JSON object"),
    (line({"messages": "hello"}), "must be a list"),
    (line({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}), "must be a string"),
    (line({"messages": [{"role": "wizard", "content": "a"}, {"role": "assistant", "content": "x"}]}), "must be user, assistant or system"),
    (line({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}), "has no 'content'"),
    (line({"messages": ["user: hi", "assistant: x"]}), "must be an object"),
    (line({"instruction": "a", "output": ["x"]}), "must be a string"),
    (line({"instruction": None, "output": "x"}), "missing field 'instruction'"),
    (line({"prompt": {"text": "a"}, "completion": "b"}), "must be a string"),
    (line({"text": "plain text, no format"}), "unrecognised record"),
    (line({}), "unrecognised record"),
    # ---- bad: missing or empty response, no prompt
    (line({"messages": [{"role": "user", "content": "no answer"}]}), "no response"),
    (line({"messages": []}), "no messages"),
    (line(chat("empty answer", "   \n\t ")), "no response"),
    (line({"instruction": "no output"}), "no response"),
    (line({"prompt": "no completion"}), "no response"),
    (line({"prompt": "x", "completion": ""}), "no response"),
    (line({"messages": [{"role": "assistant", "content": "answer first"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}), "no prompt"),
    # ---- bad after tokenisation: a 10 MB prompt leaves no response token within max_len
    (line(chat("blah " * (TEN_MB // 5), "the answer", id="huge-prompt")), f"empty after truncation to {MAX_LEN} tokens"),
]
BLANK_LINES = [b"", b"   ", b"\t"]  # not records: skipped without a report


def write_corpus(folder: Path) -> tuple[Path, dict[int, bytes], dict[int, str]]:
    """pool.jsonl with blank lines interleaved; returns (path, good line → bytes, bad line → reason)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[bytes] = []
    good: dict[int, bytes] = {}
    bad: dict[int, str] = {}
    for k, (data, reason) in enumerate(CORPUS):
        if k % 7 == 3:
            rows.append(BLANK_LINES[k % len(BLANK_LINES)])
        rows.append(data)
        number = len(rows)
        if reason is None:
            good[number] = data.removeprefix(b"\xef\xbb\xbf").removesuffix(b"\r")
        else:
            bad[number] = reason
    path = folder / "pool.jsonl"
    path.write_bytes(b"\n".join(rows) + b"\n")
    return path, good, bad


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


# ============================================================================ reading and tokenising


def test_every_bad_line_is_reported_and_every_good_record_kept_verbatim(corpus, tokenizer):
    path, good, bad = corpus
    records, skipped = load_records(path)
    examples, tok_bad = tokenize_records(records, tokenizer, MAX_LEN)
    reported = {b.line: b.reason for b in skipped + tok_bad}
    assert all(b.file == str(path) for b in skipped + tok_bad)
    assert sorted(reported) == sorted(bad), "every bad line reported exactly once, and nothing else"
    for number, reason in bad.items():
        assert reason in reported[number], (number, reason, reported[number])
    kept = {e.id for e in examples}
    by_line = {r.line: r for r in records if r.id in kept}
    assert sorted(by_line) == sorted(good)
    for number, data in good.items():
        assert by_line[number].raw.encode("utf-8") == data
    assert all(len(e.input_ids) <= MAX_LEN and any(label != -100 for label in e.labels) for e in examples)
    ids = [r.id for r in records]
    assert len(set(ids)) == len(ids) and "dup" not in ids and "twin" not in ids  # duplicates get content-hash ids
    assert "chat-1" in ids and "7" in ids


def test_huge_records_cost_what_short_ones_do(tokenizer, tmp_path, monkeypatch):
    """Text beyond max_len × 64 characters is cut before tokenising: the first max_len tokens are unchanged."""
    from gist_backend.engine import tokenize as tokenize_mod
    from gist_backend.engine.records import Record

    def record(rid: str, answer: str) -> Record:
        return Record(rid, "s", "all", ({"role": "user", "content": "Say it."}, {"role": "assistant", "content": answer}), "{}", "f", 1)

    tokenised_chars = []  # what reaches the tokenizer, per record, whichever encoding path it takes
    for name in ("_encode_offsets", "_encode_segments"):
        real = getattr(tokenize_mod, name)
        monkeypatch.setattr(tokenize_mod, name, lambda tok, plans, real=real: tokenised_chars.extend(
            sum(len(text) for text, _ in segs) for _, segs in plans) or real(tok, plans))  # fmt: skip
    (huge,), _ = tokenize_records([record("h", "word " * (TEN_MB // 5))], tokenizer, MAX_LEN)
    assert tokenised_chars == [MAX_LEN * tokenize_mod._MAX_CHARS_PER_TOKEN]  # 10 MB in, max_len × 64 characters tokenised
    (short,), _ = tokenize_records([record("s", "word " * (MAX_LEN * 4))], tokenizer, MAX_LEN)
    assert huge.input_ids == short.input_ids and huge.labels == short.labels


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("empty.jsonl", b"", "is empty"),
        ("blank.jsonl", b"\n  \n\t\n", "is empty"),
        ("empty.json", b"", "is empty"),
        ("all-bad.jsonl", b"{oops\n[1]\n", "has no usable records"),
        ("array-in.jsonl", b'[\n  {\n    "prompt": "a",\n    "completion": "b"\n  }\n]\n', "rename it to .json"),
        ("broken.json", b'[{"prompt": "a", "completion": "b"}, {"prompt": ', "is not valid JSON"),
        ("deep.json", b"[" * 100_000, "nested too deeply"),
        ("bigint.json", b'[{"id": 1' + b"0" * 5000 + b"}]", "not usable JSON"),
        ("scalar.json", b"42", "expected a JSON list"),
        ("latin1.json", b'[{"prompt": "\xe9", "completion": "b"}]', "not UTF-8"),
        ("pool.csv", b"prompt,completion\na,b\n", "unsupported file type"),
        ("fake.parquet", b"PAR1 not really", "not a readable Parquet file"),
        ("cut.jsonl.gz", gzip.compress(b'{"prompt": "a", "completion": "b"}\n' * 50)[:40], "could not be read"),
    ],
)
def test_unusable_files_give_a_data_error_naming_them(tmp_path, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DataError) as err:
        load_records(path)
    assert str(path) in str(err.value) and message in str(err.value), str(err.value)


def test_missing_path_and_plain_folder(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="not a dataset saved"):
        load_records(tmp_path / "folder")


def test_json_array_and_parquet_with_bad_rows(tmp_path):
    rows = [
        {"prompt": "a", "completion": "b"},
        {"prompt": "c", "completion": None},
        "a string",
        {"instruction": "x", "output": "y", "id": "j-1"},
        {"prompt": "lone \ud800", "completion": "z"},
    ]
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(rows))  # ASCII escapes, so the lone surrogate is legal JSON text
    records, bad = load_records(path)
    assert [r.line for r in records] == [1, 4]
    assert {b.line: b.reason.split(":")[0] for b in bad} == {2: "no response", 3: "record must be a JSON object, got str", 5: "invalid Unicode"}

    table = pl.DataFrame({"prompt": ["p1", "p2", None, "p4"], "completion": ["c1", "", "c3", "c4"], "n": [1, 2, 3, 4]})
    table.write_parquet(tmp_path / "pool.parquet")
    records, bad = load_records(tmp_path / "pool.parquet")
    assert [r.line for r in records] == [1, 4] and {b.line for b in bad} == {2, 3}
    assert json.loads(records[1].raw) == {"prompt": "p4", "completion": "c4", "n": 4}


# ============================================================================ a whole run on the corpus


@pytest.fixture(scope="module")
def hostile_run(tiny_llama, corpus, tmp_path_factory):
    from gist_backend.devkit.tiny import make_toy_data

    path, good, bad = corpus
    folder = tmp_path_factory.mktemp("hostile-run")
    _, val = make_toy_data(folder / "data", n_train=4, n_val=12)
    extra = folder / "more.json"  # a second file: same id as in pool.jsonl, and one bad element
    extra.write_text(json.dumps([chat("again", "same id, other file", id="chat-1"), {"prompt": 3, "completion": "x"}]))
    config = ComputeConfig(
        model=str(tiny_llama), train=[str(path), str(extra)], val=[str(val)], warmup=False, k_max=4, max_len=MAX_LEN,
        shard_size=16, max_batch=8,
    )  # fmt: skip
    run_dir = compute(config, folder / "run")
    return open_run(run_dir), good, bad, path, extra


def test_run_reports_bad_records_and_exports_good_ones_byte_identical(hostile_run, tmp_path):
    run, good, bad, path, extra = hostile_run
    report = [json.loads(x) for x in (run.path / "bad_records.jsonl").read_text().splitlines()]
    assert {(r["file"], r["line"]) for r in report} == {(str(path), n) for n in bad} | {(str(extra), 2)}
    assert all(r["split"] == "train" and r["reason"] for r in report)
    assert run.manifest["bad_records"] == len(report) and run.train.height == len(good) + 1
    assert "chat-1-2" in run.train["id"].to_list()  # same id in two files: both kept
    assert run.k_max == 4  # 12 validation examples, k_max 4

    selection = select(run, method="gist", budget=run.train.height)
    out = tmp_path / "all.jsonl"
    manifest = json.loads(export_jsonl(run, selection, out).read_text())
    lines = out.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) - 1 == run.train.height
    from_pool = sorted(x for x in lines[:-1] if x != line(chat("again", "same id, other file", id="chat-1")))
    assert from_pool == sorted(good.values())  # every good record, byte for byte, nothing else
    assert manifest["reserialised"] == 0 and manifest["count"] == run.train.height

    top = select(run, method="gist", budget=5)
    export_jsonl(run, top, tmp_path / "top.jsonl")
    assert set((tmp_path / "top.jsonl").read_bytes().split(b"\n")[:-1]) <= set(lines)


def test_pool_smaller_than_budget_is_clamped_with_a_warning(hostile_run, tmp_path):
    run = hostile_run[0]
    selection = select(run, method="gist", budget=10_000)
    assert len(selection.ids) == run.train.height
    assert any("pool smaller than the budget" in w for w in selection.warnings)
    manifest = json.loads(export_jsonl(run, selection, tmp_path / "x.jsonl").read_text())
    assert manifest["count"] == run.train.height and manifest["warnings"] == selection.warnings


def test_validation_set_of_one_example(tiny_llama, tmp_path):
    from gist_backend.devkit.tiny import make_toy_data

    pool, val = make_toy_data(tmp_path / "data", n_train=12, n_val=3)
    one = tmp_path / "one.jsonl"
    one.write_text(val.read_text().splitlines()[0] + "\n")
    config = ComputeConfig(model=str(tiny_llama), train=[str(pool)], val=[str(one)], warmup=False, k_max=8, max_len=MAX_LEN)
    run = open_run(compute(config, tmp_path / "run"))
    assert run.k_max == 1 and run.val.height == 1
    values = scores(run, "gist", 1)
    assert values.shape == (12,) and np.isfinite(values).all() and set(np.round(np.abs(values), 6)) <= {1.0}
    assert len(select(run, method="gist", budget=3).ids) == 3


def test_cli_compute_with_an_empty_pool_file_names_it(tiny_llama, corpus, tmp_path, capsys):
    from gist_backend.cli import main as cli_main

    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    val = tmp_path / "val.jsonl"
    val.write_text(line(chat("q", "a")).decode() + "\n")
    with pytest.raises(SystemExit) as exit_:
        cli_main(["compute", "--model", str(tiny_llama), "--train", str(corpus[0]), str(empty), "--val", str(val),
                  "--run-dir", str(tmp_path / "run"), "--no-warmup", "--max-len", str(MAX_LEN)])  # fmt: skip
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"\nerror: {empty} is empty" in "\n" + err and "Traceback" not in err
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["status"] == "failed"
