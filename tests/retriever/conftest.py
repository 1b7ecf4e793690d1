"""Retriever fixtures: a small byte-level BPE tokenizer trained here, a tiny random Llama saved as a
model folder that `blend.loader.load` accepts, the real MiniLM embedder, and a document set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CORPUS = [
    "The river Thames flows through London and reaches the North Sea at its estuary.",
    "Paris is the capital of France; the Seine crosses it from east to west.",
    "Photosynthesis converts light, water and carbon dioxide into sugar and oxygen.",
    "The Great Wall of China was built over many centuries by several dynasties.",
    "A tokenizer splits text into pieces; a byte-level one never meets an unknown character.",
    "Mount Everest, on the border of Nepal and China, is the highest mountain above sea level.",
    "Jazz grew in New Orleans from blues, ragtime and brass band music.",
    "The Pacific is the largest and deepest of the world's oceans.",
]

TOPICS = {
    "thames": "The river Thames flows east through Oxford and London. Barges once carried coal on it. "
              "Its tidal reach ends at Teddington Lock, and its estuary opens into the North Sea.",
    "photosynthesis": "Plants turn sunlight into chemical energy. Chlorophyll absorbs red and blue light. "
                      "Carbon dioxide and water become glucose, and oxygen is released as a by-product.",
    "everest": "Mount Everest rises 8,849 metres on the border of Nepal and China. Climbers use bottled "
               "oxygen above the death zone. Tenzing Norgay and Edmund Hillary reached it in 1953.",
    "jazz": "Jazz began in New Orleans early in the twentieth century. Louis Armstrong's trumpet solos "
            "shaped it; swing, bebop and cool jazz followed in later decades.",
    "unicode": "Tokyo (東京) and Kyōto are cities in Japan 🇯🇵. Sushi 🍣 and ramen 🍜 are popular; the "
               "word 'café' keeps its accent. Ünïcödé text must never be cut inside a character.",
}


def bpe_tokenizer():
    """A byte-level BPE of ~400 tokens: CJK and emoji stay split into byte tokens, which is the case
    where a token boundary can fall inside a character."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(CORPUS + list(TOPICS.values()), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def tokenizer():
    return bpe_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer random Llama with the BPE above, saved as a Hugging Face folder (`--model DIR`)."""
    from tests.conftest import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer, len(tokenizer), 1024)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir, tmp_path_factory):
    from blend.loader import load

    return load(str(tiny_model_dir), tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def embedder():
    from retriever.embedder import Embedder

    return Embedder(batch_size=16)


def write_docs(folder: Path, topics: dict[str, str] = TOPICS, repeat: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in topics.items():
        (folder / f"{name}.md").write_text(f"# {name.title()}\n\n" + " ".join([text] * repeat) + "\n")
    return folder


def write_musique(path: Path) -> Path:
    """Two questions sharing a passage: three distinct passages in four slots."""
    shared = {"title": "Thames", "text": TOPICS["thames"]}
    questions = [
        {"question": "Where does the Thames end?", "answers": ["North Sea"],
         "ctxs": [shared, {"title": "Jazz", "text": TOPICS["jazz"]}]},
        {"question": "Who first climbed Everest?", "answers": ["Tenzing Norgay and Edmund Hillary"],
         "ctxs": [shared, {"title": "Everest", "text": TOPICS["everest"]}]},
    ]
    path.write_text(json.dumps(questions))
    return path
