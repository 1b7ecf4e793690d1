"""Prompt layout: a system prefix, chunks in the order given, then the question.

Every piece is tokenized on its own and the pieces are concatenated, so chunk boundaries are
metadata carried by the layout, never separator strings searched for in a tokenized prompt; the
same token ids feed every mode, which is what makes the modes comparable token for token.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

DEFAULT_SYSTEM = (
    "You are a helpful assistant. Answer the question using the passages. "
    "Give only the answer, in a few words."
)
_SENTINEL = "\x00KVBLEND-USER-CONTENT\x00"


class TokenIds(tuple):
    """A piece's token ids (a tuple, equal to and hashed as the plain one) that also carries them packed as int64
    (`packed`, read-only), e.g. a view of the chunk tokenizer's cache: a request's ids then reach the device from
    a few packed pieces (`PromptLayout.packed_ids`) instead of a pass over ~5,000 Python ints each request."""

    packed: np.ndarray

    def __new__(cls, ids):
        packed = ids if isinstance(ids, array) and ids.typecode == "q" else array("q", ids)
        self = super().__new__(cls, packed)
        self.packed = np.frombuffer(packed, dtype=np.int64)
        self.packed.flags.writeable = False
        return self


def pack_ids(piece) -> np.ndarray:
    """A piece's token ids as int64: a `TokenIds` one's own packed view, any other sequence converted."""
    packed = getattr(piece, "packed", None)
    return packed if packed is not None else np.fromiter(piece, np.int64, len(piece))


@dataclass(frozen=True)
class PromptLayout:
    prefix: tuple[int, ...]
    chunks: tuple[tuple[int, ...], ...]
    suffix: tuple[int, ...]

    @property
    def token_ids(self) -> list[int]:
        ids = list(self.prefix)
        for chunk in self.chunks:
            ids.extend(chunk)
        return ids + list(self.suffix)

    def packed_ids(self) -> np.ndarray:
        """`token_ids` as one int64 array, each `TokenIds` piece (the served chunks) copied as it is packed."""
        return np.concatenate([pack_ids(self.prefix), *map(pack_ids, self.chunks), pack_ids(self.suffix)])

    def __len__(self) -> int:
        return len(self.prefix) + sum(map(len, self.chunks)) + len(self.suffix)

    def chunk_starts(self) -> list[int]:
        starts, offset = [], len(self.prefix)
        for chunk in self.chunks:
            starts.append(offset)
            offset += len(chunk)
        return starts


def format_passage(title: str, text: str) -> str:
    return f"{title.strip()}\n{text.strip()}\n\n" if title and title.strip() else f"{text.strip()}\n\n"


def encode_user_text(tokenizer, text: str) -> tuple[int, ...]:
    """Token ids of text a user wrote (a passage, a question). Special-token strings in it, such as
    `<|im_end|>`, are split into plain tokens: only the chat template may write control tokens, so a
    passage cannot close the user turn and open another. The chunker keys chunks by these same ids."""
    return tuple(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]) if text else ()


# Chunks recur from request to request (that is what the cache is for); their token ids are kept, packed,
# for the last this many distinct texts: tokenizing ten 600-token passages took ~8 ms of every request
# on this 2-core CPU, TTFT before the first layer runs (`python3 -m services.bench.probe_prompt`).
CHUNK_IDS_CACHED = 4096


@lru_cache(maxsize=CHUNK_IDS_CACHED)
def _chunk_ids(tokenizer, text: str) -> TokenIds:
    return TokenIds(array("q", encode_user_text(tokenizer, text)))


def encode_chunk(tokenizer, text: str) -> TokenIds:
    """`encode_user_text` of a passage, remembered for the last CHUNK_IDS_CACHED distinct passages (a
    tokenizer never changes while the process runs: the same text always gives the same ids); packed too. The
    remembered object itself (immutable: a tuple, its packed view read-only), not a copy made per request."""
    return _chunk_ids(tokenizer, text)


@lru_cache(maxsize=256)  # the chat template's fixed pieces: a handful of texts per tokenizer
def _encode_template(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=False, split_special_tokens=False)["input_ids"]) if text else ()


@lru_cache(maxsize=64)
def chat_frame(tokenizer, system: str | None) -> tuple[str, str]:
    """The chat template's text before and after the user's message (rendered once per tokenizer and
    system text)."""
    if not getattr(tokenizer, "chat_template", None):
        bos = tokenizer.bos_token or ""
        return bos + (f"{system}\n\n" if system else ""), "\nAnswer:"
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": _SENTINEL}
    ]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    head, tail = rendered.split(_SENTINEL)
    return head, tail


def build_layout(tokenizer, chunks: list[str], question: str, system: str | None = DEFAULT_SYSTEM) -> PromptLayout:
    if not question or not question.strip():
        raise ValueError("empty question")
    head, tail = chat_frame(tokenizer, system)
    ask = f"Question: {question.strip()}" if chunks else question.strip()
    return PromptLayout(
        prefix=_encode_template(tokenizer, head),
        chunks=tuple(encode_chunk(tokenizer, chunk) for chunk in chunks),
        suffix=encode_user_text(tokenizer, ask) + _encode_template(tokenizer, tail),
    )


def build_chat_layout(tokenizer, chunks: list[str], messages: list[tuple[str, str]],
                      system: str | None = DEFAULT_SYSTEM) -> PromptLayout:
    """A conversation's layout: the same system prefix and chunks as `build_layout`, then the messages
    rendered with the model's chat template. The chunks open the first user message, so their cached KV
    (computed behind the server's system prefix) fits every conversation. The caller's system messages
    cannot replace that prefix; their text leads the first user message, after the chunks. With one user
    message the layout is `build_layout`'s for that question."""
    system_texts = [content.strip() for role, content in messages if role == "system" and content.strip()]
    turns = [(role, content) for role, content in messages if role != "system"]
    if not turns or turns[0][0] != "user" or turns[-1][0] != "user":
        raise ValueError("a chat must start and end with a user message (after any system messages)")
    first = turns[0][1].strip()
    if chunks:
        first = f"Question: {first}"
    turns[0] = ("user", "\n\n".join([*system_texts, first]))
    head, _ = chat_frame(tokenizer, system)
    if not getattr(tokenizer, "chat_template", None):
        text = "\n".join(f"{role}: {content.strip()}" if i else content for i, (role, content) in enumerate(turns))
        return PromptLayout(_encode_template(tokenizer, head), tuple(encode_chunk(tokenizer, c) for c in chunks),
                            encode_user_text(tokenizer, text) + _encode_template(tokenizer, "\nAnswer:"))
    marks = [f"\x00KVBLEND-MESSAGE-{i}\x00" for i in range(len(turns))]
    rendered = tokenizer.apply_chat_template(
        ([{"role": "system", "content": system}] if system else [])
        + [{"role": role, "content": mark} for (role, _), mark in zip(turns, marks, strict=True)],
        add_generation_prompt=True, tokenize=False)
    suffix: list[int] = []
    rest = rendered
    for i, ((_, content), mark) in enumerate(zip(turns, marks, strict=True)):
        before, found, rest = rest.partition(mark)
        if not found:
            raise ValueError("the chat template dropped a message")
        if i == 0:
            if before != head:
                raise ValueError("the chat template renders the first user message after other text than the "
                                 "system prefix")
        else:
            suffix += _encode_template(tokenizer, before)
        suffix += encode_user_text(tokenizer, content.strip() if i else content)
    suffix += _encode_template(tokenizer, rest)
    return PromptLayout(_encode_template(tokenizer, head), tuple(encode_chunk(tokenizer, c) for c in chunks),
                        tuple(suffix))
