"""Tokenise chat records with the model's chat template (or a plain fallback), labelling only assistant tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

from .normalise import Unusable
from .records import BadRecord, Record

IGNORE_INDEX = -100  # label of tokens the loss ignores (prompt, padding), as Hugging Face causal LMs expect
_TOKENIZE_CHUNK = 2048  # texts per batched tokenizer call: bounds memory, keeps the Rust tokenizer busy
# Text beyond max_len × this many characters cannot reach the first max_len tokens of any real tokenizer
# (they average 3-5 characters a token): it is cut before tokenising, so a 10 MB record costs what a
# short one does instead of a minute of tokenizer time for tokens that truncation drops anyway.
_MAX_CHARS_PER_TOKEN = 64


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids and labels (IGNORE_INDEX outside assistant tokens; unshifted, as HF causal LMs expect)."""

    id: str
    input_ids: list[int]
    labels: list[int]


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
        except Unusable as e:
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
        raise Unusable(f"chat template failed: {e}") from e
    if segs is None:
        raise Unusable("chat template does not render the prompt as a prefix of the conversation; cannot locate the response")
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

