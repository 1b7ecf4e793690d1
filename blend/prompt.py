"""Prompt layout: a system prefix, chunks in the order given, then the question.

Every piece is tokenized on its own and the pieces are concatenated, so chunk boundaries are
metadata carried by the layout, never separator strings searched for in a tokenized prompt; the
same token ids feed every mode, which is what makes the modes comparable token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_SYSTEM = (
    "You are a helpful assistant. Answer the question using the passages. "
    "Give only the answer, in a few words."
)
_SENTINEL = "\x00KVBLEND-USER-CONTENT\x00"


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


def _encode_template(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=False, split_special_tokens=False)["input_ids"]) if text else ()


def chat_frame(tokenizer, system: str | None) -> tuple[str, str]:
    """The chat template's text before and after the user's message."""
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
        chunks=tuple(encode_user_text(tokenizer, chunk) for chunk in chunks),
        suffix=encode_user_text(tokenizer, ask) + _encode_template(tokenizer, tail),
    )
