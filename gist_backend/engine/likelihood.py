"""Held-out scoring of a model on target test records: response loss and multiple-choice accuracy by log-likelihood.

Test record form: any record ``load_records`` accepts (chat, Alpaca, prompt/completion), optionally with
    "choices":      every candidate *assistant reply* (list of ≥ 2 strings), and
    "answer_index": the index of the correct one in "choices".
The loss of a record is the mean cross-entropy of its own final assistant reply (response tokens only). With
choices, each candidate replaces that reply in turn; the answer is the candidate of highest mean log-likelihood
per response token (``accuracy``; ``accuracy_sum`` uses the summed log-likelihood). The candidates of one
question share their prompt: it runs once through the decoder with a KV cache and the K continuations run as
one batch on the repeated cache (the same numbers as K full sequences, checked in the tests).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .grads import causal_lm_parts
from .records import DataError, Record, load_records
from .tokenize import IGNORE_INDEX, tokenize_records


@dataclass(frozen=True)
class TestSet:
    """Tokenised candidates of every test question."""

    ids: list[str]  # test record ids
    candidates: list[list[tuple[list[int], list[int]]]]  # per question: (input_ids, labels) per candidate
    response: list[int]  # per question: the candidate that is the record's own reply (its loss is the test loss)
    answer: list[int | None]  # per question: the correct candidate, None without choices
    n_choices: list[int]  # per question: how many of the first candidates are its choices (0 without choices)

    @property
    def multiple_choice(self) -> np.ndarray:
        return np.asarray([a is not None for a in self.answer])


def _choices(record: Record) -> tuple[list[str] | None, int | None]:
    """The record's ("choices", "answer_index"), checked; (None, None) when it has none."""
    try:
        raw = json.loads(record.raw)
    except ValueError:
        raw = {}
    choices, answer = raw.get("choices") if isinstance(raw, dict) else None, raw.get("answer_index") if isinstance(raw, dict) else None
    if choices is None:
        return None, None
    where = f"{record.file} line {record.line}"
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: 'choices' must list at least two candidate replies (strings)")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise DataError(f"{where}: 'answer_index' must be the index of the correct reply in 'choices' (0..{len(choices) - 1})")
    return choices, answer


def load_test_set(path: str | Path, tokenizer, max_len: int) -> tuple[TestSet, list[Record]]:
    """Read and tokenise a test file; DataError naming the file when a record is unusable."""
    records, bad = load_records(path)
    if bad:
        raise DataError(f"{path}: {len(bad)} test record(s) unusable (first: line {bad[0].line}: {bad[0].reason}); fix or remove them")
    flat, owners, questions = [], [], []
    for q, rec in enumerate(records):
        choices, answer = _choices(rec)
        reply = rec.messages[-1]["content"]
        replies = list(choices) if choices else [reply]
        response = replies.index(reply) if reply in replies else len(replies)
        if response == len(replies):
            replies.append(reply)
        for c, text in enumerate(replies):
            flat.append(Record(f"{rec.id}#{c}", rec.source, rec.task, rec.messages[:-1] + ({"role": "assistant", "content": text},), "", rec.file, rec.line))
            owners.append(q)
        questions.append((response, answer, len(choices) if choices else 0))
    examples, tok_bad = tokenize_records(flat, tokenizer, max_len)
    if tok_bad:
        raise DataError(f"{path}: line {tok_bad[0].line}: {tok_bad[0].reason}; raise the max length or shorten the record")
    candidates: list[list] = [[] for _ in records]
    for example, q in zip(examples, owners):
        candidates[q].append((example.input_ids, example.labels))
    return TestSet([r.id for r in records], candidates, [q[0] for q in questions], [q[1] for q in questions], [q[2] for q in questions]), records


def _question(decoder, head, candidates: list[tuple[list[int], list[int]]], device) -> list[tuple[float, int]]:
    """(summed cross-entropy, response token count) of each candidate of one question, sharing the prompt."""
    ids = [c[0] for c in candidates]
    prefix = 0
    while prefix < min(map(len, ids)) - 1 and all(x[prefix] == ids[0][prefix] for x in ids):
        prefix += 1
    prefix = max(prefix, 1)
    first = decoder(input_ids=torch.tensor([ids[0][:prefix]], device=device), use_cache=True)
    cache = first.past_key_values
    tails = [x[prefix:] for x in ids]
    width, k = max(map(len, tails)), len(ids)
    tail_ids = torch.zeros(k, width, dtype=torch.long, device=device)
    mask = torch.zeros(k, prefix + width, dtype=torch.long, device=device)
    mask[:, :prefix] = 1
    for row, tail in enumerate(tails):
        tail_ids[row, : len(tail)] = torch.tensor(tail, device=device)
        mask[row, prefix : prefix + len(tail)] = 1
    if k > 1:
        cache.batch_repeat_interleave(k)
    rest = decoder(input_ids=tail_ids, attention_mask=mask, past_key_values=cache, use_cache=True).last_hidden_state
    out = []
    for row, (_, labels) in enumerate(candidates):
        hidden = torch.cat([first.last_hidden_state[0], rest[row, : len(tails[row])]])  # positions 0 … len-1
        targets = torch.tensor(labels[1:], device=device)
        supervised = targets != IGNORE_INDEX
        ce = torch.nn.functional.cross_entropy(head(hidden[:-1][supervised]).float(), targets[supervised], reduction="sum")
        out.append((float(ce), int(supervised.sum())))
    return out


def score(model, test: TestSet, device, autocast=None, progress=None) -> dict[str, np.ndarray]:
    """Per question: "loss" (mean CE of its reply), "correct" and "correct_sum" (NaN without choices)."""
    decoder, head = causal_lm_parts(model)
    model.eval()
    n = len(test.ids)
    loss, correct, correct_sum = np.empty(n), np.full(n, np.nan), np.full(n, np.nan)
    amp = torch.autocast(device.type, dtype=autocast) if autocast is not None else torch.autocast(device.type, enabled=False)
    with torch.no_grad(), amp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*past_key_values.*")
        for q in range(n):
            results = _question(decoder, head, test.candidates[q], device)
            mean_ll = [-ce / max(count, 1) for ce, count in results]
            loss[q] = -mean_ll[test.response[q]]
            k = test.n_choices[q]
            if k:
                correct[q] = float(int(np.argmax(mean_ll[:k])) == test.answer[q])
                correct_sum[q] = float(int(np.argmax([-ce for ce, _ in results[:k]])) == test.answer[q])
            if progress is not None:
                progress(q + 1, n)
    return {"loss": loss, "correct": correct, "correct_sum": correct_sum}
