"""The plain data that crosses the serving path's threads: requests in, results and reports out.

Passive dataclasses only: the gRPC handler builds a request, the engine checks it once, the model
thread fills a report; none of them holds another's objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from blend.decode import Sampling
from blend.fusor import BlendConfig


@dataclass(frozen=True)
class DocumentIn:
    text: str
    title: str = ""
    doc_id: str = ""


@dataclass
class IngestResult:
    chunk_ids: list[list[str]]  # per document, in request order
    doc_ids: list[str]
    added: int = 0
    existing: int = 0
    kv_computed: int = 0
    kv_not_stored: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class Retrieved:
    chunk_id: str
    score: float
    title: str
    doc_id: str
    text: str
    tokens: int


@dataclass(frozen=True)
class GenerateParams:
    query: str = ""  # or `messages`
    chunk_ids: tuple[str, ...] = ()
    top_k: int = 0  # 0 with no chunk ids: the server's default
    mode: str = ""  # "" = the server's default
    ratio: float | None = None
    max_new_tokens: int = 0  # 0 = the server's default
    documents: tuple[DocumentIn, ...] = ()  # inline passages, instead of chunk ids or top_k
    messages: tuple[tuple[str, str], ...] = ()  # (role, content) of a chat, instead of the query
    temperature: float = 0.0  # 0 = greedy
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    """A checked Generate request, as the model thread receives it."""

    tenant: str
    query: str  # the question, or a chat's last user message
    texts: list[str]  # the chunks' texts, in prompt order
    chunk_ids: list[str]
    scores: list[float]
    config: BlendConfig
    max_new_tokens: int
    arrived: float  # perf_counter at arrival
    retrieve_s: float
    deadline: float | None  # monotonic
    documents: tuple[range, ...] = ()  # inline documents: the indexes of each one's chunks
    messages: tuple[tuple[str, str], ...] = ()  # a chat: rendered with the chat template after the chunks
    sampling: Sampling = Sampling()
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class PlanReport:
    """What the loading controller decided for one blend request."""

    planned: bool = False  # False: the controller is off or has no measurements yet
    ratio: float = 0.0
    recompute_chunk_ids: tuple[str, ...] = ()
    predicted_load_s: float = 0.0
    predicted_compute_s: float = 0.0
    reason: str = ""


@dataclass
class QualityCheck:
    checked: bool = False
    kl: float = 0.0
    agree: bool = False
    fell_back: bool = False


@dataclass(frozen=True)
class DocumentReport:
    chunk_ids: tuple[str, ...]
    hit: bool  # every chunk's KV came from the store
    chunks_computed: int


@dataclass
class Report:
    mode: str
    ratio: float
    chunk_ids: list[str]
    scores: list[float]
    prompt_tokens: int = 0
    chunk_tokens: int = 0
    chunks_hit: dict[str, int] = field(default_factory=dict)
    chunks_missing: int = 0
    missing_tokens: int = 0
    tokens_recomputed: int = 0
    queue_s: float = 0.0
    retrieve_s: float = 0.0
    load_s: float = 0.0
    load_wait_s: float = 0.0
    compute_s: float = 0.0
    missing_compute_s: float = 0.0
    quality: QualityCheck = field(default_factory=QualityCheck)
    degraded_tiers: list[str] = field(default_factory=list)
    plan: PlanReport = field(default_factory=PlanReport)
    load_stall_s: float = 0.0  # GPU seconds waiting for a KV copy (CUDA)
    stalled_layers: int = 0
    chunk_sources: list[str] = field(default_factory=list)  # per chunk: a tier, computed, recomputed, prefill
    documents: list[DocumentReport] = field(default_factory=list)  # inline documents, in request order
    cached_tokens: int = 0  # prompt tokens whose KV came from a cache (the system prefix included)


@dataclass(frozen=True)
class Piece:
    """One streamed message: its tokens and their text; the first carries TTFT and the report, the
    last the finish."""

    text: str
    token_ids: tuple[int, ...]
    ttft_s: float | None = None
    report: Report | None = None
    finish: Finish | None = None


@dataclass(frozen=True)
class Finish:
    reason: str  # stop, length or context
    tokens: int
    seconds: float
