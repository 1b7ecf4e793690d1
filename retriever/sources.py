"""Documents to ingest, read from a MuSiQue-shaped JSON file, a folder of .txt/.md files or JSON lines.

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


def musique_documents(path: Path, skip: Skip) -> Iterator[Document]:
    """Every distinct passage of every question, in file order (passages repeat across questions)."""
    try:
        questions = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a JSON file ({err})") from None
    if not isinstance(questions, list) or not all(isinstance(q, dict) and "ctxs" in q for q in questions):
        raise ValueError(f"{path}: expected a list of "
                         '{"question", "answers", "ctxs": [{"title", "text"}]}')
    seen: set[tuple[str, str]] = set()
    for q, question in enumerate(questions):
        for p, passage in enumerate(question["ctxs"]):
            title, text = str(passage.get("title") or ""), str(passage.get("text") or "")
            if not text.strip():
                skip(f"{path.name} question {q} passage {p}: empty text")
                continue
            if (title, text) in seen:
                continue
            seen.add((title, text))
            yield Document(doc_id=f"{path.name}:{q}:{p}", title=title, text=text)


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
