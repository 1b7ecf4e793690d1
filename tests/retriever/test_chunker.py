"""Facts about chunking on the serving model's tokens: sizes, cuts, titles, ids."""

import pytest

from blend.prompt import format_passage
from retriever.chunker import MIN_CHUNK_TOKENS, Chunker, chunk_id

from tests.helpers.corpus import TOPICS

LONG = " ".join(TOPICS.values()) * 3


def _bodies(chunks, title):
    head = f"{title}\n" if title else ""
    for chunk in chunks:
        assert chunk.text.startswith(head) and chunk.text.endswith("\n\n")
        yield chunk.text[len(head):].strip()


@pytest.mark.parametrize("size", [16, 24, 64, 512])
def test_every_chunk_tokenized_on_its_own_fits_the_size(tokenizer, size):
    chunks = Chunker(tokenizer, size).split(LONG, "World facts")
    assert chunks
    for chunk in chunks:
        assert chunk.token_ids == tuple(tokenizer(chunk.text, add_special_tokens=False)["input_ids"])
        assert len(chunk.token_ids) <= size


@pytest.mark.parametrize("size", [16, 24, 40])
def test_cuts_fall_between_tokens_and_characters_and_lose_nothing(tokenizer, size):
    text = TOPICS["unicode"] * 4  # CJK and emoji are several byte-level tokens each here
    chunks = Chunker(tokenizer, size).split(text)
    bodies = list(_bodies(chunks, ""))
    assert len(bodies) > 3
    assert all("\ufffd" not in body for body in bodies)
    assert "".join("".join(bodies).split()) == "".join(text.split())
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = encoded["offset_mapping"]
    token_starts = {spans[j][0] for j in range(1, len(spans)) if spans[j - 1][1] <= spans[j][0]}
    position = 0
    for before, after in zip(bodies, bodies[1:]):
        end = text.index(before, position) + len(before)
        start = text.index(after, end)
        assert text[end:start].strip() == ""
        assert any(end <= c <= start for c in token_starts), f"cut at {end}..{start} is inside a token"
        position = start


def test_long_passage_repeats_its_title_at_the_head_of_every_chunk(tokenizer):
    chunks = Chunker(tokenizer, 32).split(LONG, "  Facts   of the  world ")
    assert len(chunks) > 5
    assert all(chunk.text.startswith("Facts of the world\n") for chunk in chunks)
    assert [chunk.position for chunk in chunks] == list(range(len(chunks)))


def test_a_short_passage_is_one_chunk_exactly_as_the_prompt_places_it(tokenizer):
    (chunk,) = Chunker(tokenizer, 512).split(TOPICS["jazz"], "Jazz", doc_id="d1")
    assert chunk.text == format_passage("Jazz", TOPICS["jazz"])
    assert chunk.doc_id == "d1" and chunk.id == chunk_id(chunk.text)


def test_a_title_longer_than_half_a_chunk_is_cut_so_text_still_fits(tokenizer):
    chunks = Chunker(tokenizer, 32).split(TOPICS["jazz"], TOPICS["everest"])
    assert chunks and all(len(c.token_ids) <= 32 for c in chunks)
    assert len(tokenizer(chunks[0].title, add_special_tokens=False)["input_ids"]) <= 16


def test_chunks_of_a_passage_are_balanced_not_full_plus_a_sliver(tokenizer):
    chunks = Chunker(tokenizer, 100).split(LONG)
    sizes = [len(c.token_ids) for c in chunks]
    assert min(sizes) >= max(sizes) // 2, sizes


@pytest.mark.parametrize("size", [0, 8, MIN_CHUNK_TOKENS - 1])
def test_a_chunk_size_below_16_is_an_error_naming_the_value(tokenizer, size):
    with pytest.raises(ValueError, match=rf"chunk size {size} tokens is below the minimum of 16"):
        Chunker(tokenizer, size)


def test_empty_text_gives_no_chunks(tokenizer):
    assert Chunker(tokenizer, 64).split(" \n\t ", "Title") == []


def test_chunk_ids_address_content_up_to_whitespace(tokenizer):
    assert chunk_id("Paris is  the capital.\n") == chunk_id("Paris is the capital.")
    assert chunk_id("Paris is the capital.") != chunk_id("Lyon is the capital.")
    first = Chunker(tokenizer, 48).split(LONG, "T")
    again = Chunker(tokenizer, 48).split(LONG, "T")
    assert [c.id for c in first] == [c.id for c in again]
    assert len({c.id for c in first}) == len({c.text for c in first})  # LONG repeats itself: so do ids


@pytest.mark.model
def test_smollm2_tokenizer_chunks_musique_passages_within_512():
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    from blend.loader import resolve
    from tests.helpers.model import CACHE_DIR

    dataset = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "musique_dev.json"
    if not dataset.exists():
        pytest.skip(f"{dataset} is not here")
    tokenizer = AutoTokenizer.from_pretrained(resolve("smollm2-135m", CACHE_DIR))
    passages = [ctx for q in json.loads(dataset.read_text())[:3] for ctx in q["ctxs"]]
    chunker = Chunker(tokenizer, 512)
    for passage in passages:
        chunks = chunker.split(passage["text"], passage["title"])
        assert all(len(c.token_ids) <= 512 and "\ufffd" not in c.text for c in chunks)
        assert "".join("".join(c.text for c in chunks).split()) == "".join(passage["text"].split())
