"""Documents to ingest, read from a MuSiQue-shaped JSON file, a folder of .txt/.md files or JSON lines;
and the one reader of MuSiQue-shaped questions (`read_musique`), which evaluation and benches share.

A document that cannot be read (empty, binary, not UTF-8, malformed) is reported through `skip`
with its name and the reason, and reading goes on; a source that cannot be opened at all raises.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

DOC_SUFFIXES = (".txt", ".md")


@dataclass(frozen=True)
class Document:
    doc_id: str
    title: str
    text: str


Skip = Callable[[str], None]


@dataclass(frozen=True)
class Passage:
    title: str
    text: str  # may be blank: passages keep their place in the file, readers skip blank ones


@dataclass(frozen=True)
class Question:
    question: str
    answers: tuple[str, ...]
    passages: tuple[Passage, ...]  # every ctx of the item, in file order


MUSIQUE_SHAPE = '[{"question", "answers", "ctxs": [{"title", "text"}]}]'


def read_musique(path: Path, limit: int | None = None) -> list[Question]:
    """The first `limit` (else all) questions of a MuSiQue-shaped JSON file, each with its passages.

    A question needs its text and at least one passage with text; an item that has neither is an
    error naming its index, not a question silently dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a MuSiQue-shaped JSON file: {MUSIQUE_SHAPE})")
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a JSON file ({err})") from None
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path} holds no questions (expected a non-empty JSON list {MUSIQUE_SHAPE})")
    questions = []
    for index, item in enumerate(items[:limit] if limit else items):
        if not isinstance(item, dict) or not str(item.get("question", "")).strip():
            raise ValueError(f"{path}: item {index} has no 'question' (expected {MUSIQUE_SHAPE})")
        contexts = item.get("ctxs")
        passages = tuple(Passage(str(c.get("title") or ""), str(c.get("text") or "")) if isinstance(c, dict)
                         else Passage("", "") for c in (contexts if isinstance(contexts, list) else []))
        if not any(p.text.strip() for p in passages):
            raise ValueError(f"{path}: item {index} ({str(item['question'])[:60]!r}) has no passages in 'ctxs'")
        answers = item.get("answers") or []
        answers = [answers] if isinstance(answers, str) else answers
        questions.append(Question(str(item["question"]), tuple(map(str, answers)), passages))
    return questions


def question_documents(questions: Iterable[Question], name: str, skip: Skip | None = None) -> Iterator[Document]:
    """Every distinct passage of `questions`, once, in file order (passages repeat across questions).

    A passage's id is `name:question:passage`, its place in the file named `name`.
    """
    seen: set[tuple[str, str]] = set()
    for q, question in enumerate(questions):
        for p, passage in enumerate(question.passages):
            if not passage.text.strip():
                if skip is not None:
                    skip(f"{name} question {q} passage {p}: empty text")
                continue
            if (passage.title, passage.text) in seen:
                continue
            seen.add((passage.title, passage.text))
            yield Document(doc_id=f"{name}:{q}:{p}", title=passage.title, text=passage.text)


def musique_documents(path: Path, skip: Skip) -> Iterator[Document]:
    """Every distinct passage of every question of a MuSiQue-shaped file, in file order."""
    return question_documents(read_musique(path), Path(path).name, skip)


def _markdown_title(text: str) -> tuple[str, str]:
    first, _, rest = text.lstrip().partition("\n")
    if first.startswith("# "):
        return first[2:].strip(), rest
    return "", text


def read_text_file(path: Path) -> str:
    """The file's text; ValueError naming the file and why it is not ingestible text."""
    data = path.read_bytes()
    if not data.strip():
        raise ValueError(f"{path}: empty file")
    if b"\x00" in data:
        raise ValueError(f"{path}: binary file (contains NUL bytes)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        byte = data[err.start]
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{byte:02x} at offset {err.start})") from None


def folder_documents(folder: Path, skip: Skip) -> Iterator[Document]:
    """Each .txt/.md file under `folder` (hidden ones aside), by path; a '# ' first line is the title."""
    if not folder.is_dir():
        raise FileNotFoundError(f"--docs {folder}: no such directory")
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.suffix.lower() not in DOC_SUFFIXES or any(part.startswith(".") for part in relative.parts):
            continue
        if not path.is_file():
            continue
        try:
            text = read_text_file(path)
        except (ValueError, OSError) as err:
            skip(f"skipped {err}")
            continue
        title, body = _markdown_title(text) if path.suffix.lower() == ".md" else ("", text)
        if not body.strip():
            skip(f"skipped {path}: no text after the title")
            continue
        yield Document(doc_id=str(relative), title=title, text=body)


def jsonl_documents(lines: Iterable[bytes | str], skip: Skip, name: str = "stdin") -> Iterator[Document]:
    """One {"text", "title"?, "id"?} object per line; blank lines are ignored."""
    for number, line in enumerate(lines, start=1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as err:
                skip(f"skipped {name} line {number}: not UTF-8 text (byte offset {err.start})")
                continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            skip(f"skipped {name} line {number}: not JSON ({err.msg})")
            continue
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str) or not text.strip():
            skip(f"skipped {name} line {number}: no \"text\" string")
            continue
        doc_id = str(record.get("id") or f"{name}:{number}")
        yield Document(doc_id=doc_id, title=str(record.get("title") or ""), text=text)
