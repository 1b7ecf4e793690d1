"""Split documents into chunks on the serving model's token boundaries, each headed by its title.

A chunk's text is exactly what a prompt holds for it (`format_passage(title, body)`), and the fusor
tokenizes each chunk text on its own; so a chunk's size is the length of its text tokenized on its
own, checked after the split, not the length of the slice of document tokens it was cut from.
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass

from blend.prompt import encode_user_text, format_passage

MIN_CHUNK_TOKENS = 16
ID_HEX_DIGITS = 16


@dataclass(frozen=True)
class Chunk:
    id: str
    text: str  # as placed in a prompt: title line, body, blank line
    title: str
    doc_id: str
    position: int  # index of the chunk within its document
    token_ids: tuple[int, ...]  # `encode_user_text(text)`: exactly the ids a prompt holds for it


def chunk_id(text: str) -> str:
    """Content address of a chunk: the same text, up to Unicode form and whitespace, has the same id."""
    normal = " ".join(unicodedata.normalize("NFC", text).split())
    return hashlib.sha256(normal.encode()).hexdigest()[:ID_HEX_DIGITS]


def check_chunk_tokens(max_tokens: int) -> int:
    if not isinstance(max_tokens, int) or max_tokens < MIN_CHUNK_TOKENS:
        raise ValueError(f"chunk size {max_tokens!r} tokens is below the minimum of {MIN_CHUNK_TOKENS} "
                         f"(pass --chunk-tokens {MIN_CHUNK_TOKENS} or more; the default is 512)")
    return max_tokens


class Chunker:
    def __init__(self, tokenizer, max_tokens: int = 512):
        check_chunk_tokens(max_tokens)
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens

    def encode(self, text: str) -> tuple[int, ...]:
        return encode_user_text(self.tokenizer, text)

    def _spans(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        # Split as `encode_user_text` splits, so the offsets belong to the ids a prompt holds.
        encoded = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True,
                                 return_offsets_mapping=True)
        return list(encoded["input_ids"]), [tuple(span) for span in encoded["offset_mapping"]]

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def split(self, text: str, title: str = "", doc_id: str = "") -> list[Chunk]:
        body = text.strip()
        if not body:
            return []
        title = self._fit_title(" ".join(title.split()))
        ids, spans = self._spans(body)
        # Tokens the title line and the closing blank line add around a body; the check below corrects
        # the estimate where merges across the seams differ.
        overhead = max(0, len(self.encode(format_passage(title, "x"))) - len(self.encode("x")))
        chunks: list[Chunk] = []
        start = 0
        while start < len(ids):
            budget = max(1, self.max_tokens - overhead)
            while True:
                end = _cut(body, spans, start, len(ids), budget)
                piece = self._decode(ids[start:end]).strip()
                chunk_text = format_passage(title, piece) if piece else ""
                token_ids = self.encode(chunk_text) if piece else ()
                excess = len(token_ids) - self.max_tokens
                if excess <= 0:
                    break
                if end - start <= 1:
                    raise ValueError(f"document {doc_id!r}: a single token does not fit a chunk of "
                                     f"{self.max_tokens} tokens (raise --chunk-tokens)")
                budget = max(1, end - start - excess)
            if piece:
                chunks.append(Chunk(id=chunk_id(chunk_text), text=chunk_text, title=title, doc_id=doc_id,
                                    position=len(chunks), token_ids=token_ids))
            start = end
        return chunks

    def _fit_title(self, title: str) -> str:
        """A title longer than half a chunk is cut to half a chunk, so every chunk keeps room for text."""
        if not title:
            return ""
        ids, spans = self._spans(title)
        limit = self.max_tokens // 2
        if len(ids) <= limit:
            return title
        end = next((j for j in range(limit, 0, -1) if _clean(spans, j)), limit)
        return title[: spans[end - 1][1]].strip()


def _clean(spans: list[tuple[int, int]], j: int) -> bool:
    """Whether a cut before token j falls between characters (byte-level tokens may share one)."""
    return spans[j - 1][1] <= spans[j][0]


def _rank(text: str, at: int) -> int:
    """How good a place character offset `at` is to end a chunk: paragraph > sentence > word > other."""
    before, after = text[max(0, at - 3):at], text[at:at + 1]
    if "\n" in before[-1:] + after:
        return 3
    if before.rstrip()[-1:] in (".", "!", "?") and (after.isspace() or before[-1:].isspace() or not after):
        return 2
    if after.isspace() or before[-1:].isspace():
        return 1
    return 0


def _cut(text: str, spans: list[tuple[int, int]], start: int, stop: int, budget: int) -> int:
    """The end of a chunk that starts at token `start` and holds at most `budget` tokens.

    The rest of the document is shared evenly among the chunks it needs, so a 600-token passage
    becomes two of ~300 rather than 512 + 88. Never inside a token or a character; near the even
    share, the latest paragraph break, else sentence end, else word gap, else clean token boundary.
    """
    remaining = stop - start
    if remaining <= budget:
        return stop
    share = -(-remaining // -(-remaining // budget))
    highest = min(start + budget, start + share + share // 8)
    lowest = start + max(1, share * 3 // 4)
    best, best_rank = None, -1
    for j in range(highest, lowest - 1, -1):
        if j <= start or not _clean(spans, j):
            continue
        rank = _rank(text, spans[j][0])
        if rank > best_rank:
            best, best_rank = j, rank
        if rank == 3:
            break
    if best is None:  # no clean boundary near the share: take the latest one further back
        best = next((j for j in range(lowest - 1, start, -1) if _clean(spans, j)), highest)
    return best
