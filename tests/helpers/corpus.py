"""Small document sets for the retriever and ingestion tests, and writers for them on disk."""

from __future__ import annotations

import json
from pathlib import Path

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
