from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Document(_message.Message):
    __slots__ = ("text", "title", "doc_id")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    text: str
    title: str
    doc_id: str
    def __init__(self, text: _Optional[str] = ..., title: _Optional[str] = ..., doc_id: _Optional[str] = ...) -> None: ...

class IngestRequest(_message.Message):
    __slots__ = ("documents",)
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    documents: _containers.RepeatedCompositeFieldContainer[Document]
    def __init__(self, documents: _Optional[_Iterable[_Union[Document, _Mapping]]] = ...) -> None: ...

class IngestedDocument(_message.Message):
    __slots__ = ("doc_id", "chunk_ids")
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_IDS_FIELD_NUMBER: _ClassVar[int]
    doc_id: str
    chunk_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, doc_id: _Optional[str] = ..., chunk_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class IngestResponse(_message.Message):
    __slots__ = ("documents", "chunks_added", "chunks_existing", "kv_computed", "kv_not_stored", "seconds")
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_ADDED_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_EXISTING_FIELD_NUMBER: _ClassVar[int]
    KV_COMPUTED_FIELD_NUMBER: _ClassVar[int]
    KV_NOT_STORED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    documents: _containers.RepeatedCompositeFieldContainer[IngestedDocument]
    chunks_added: int
    chunks_existing: int
    kv_computed: int
    kv_not_stored: int
    seconds: float
    def __init__(self, documents: _Optional[_Iterable[_Union[IngestedDocument, _Mapping]]] = ..., chunks_added: _Optional[int] = ..., chunks_existing: _Optional[int] = ..., kv_computed: _Optional[int] = ..., kv_not_stored: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class RetrieveRequest(_message.Message):
    __slots__ = ("query", "k")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    query: str
    k: int
    def __init__(self, query: _Optional[str] = ..., k: _Optional[int] = ...) -> None: ...

class RetrievedChunk(_message.Message):
    __slots__ = ("chunk_id", "score", "title", "doc_id", "text", "tokens")
    CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    chunk_id: str
    score: float
    title: str
    doc_id: str
    text: str
    tokens: int
    def __init__(self, chunk_id: _Optional[str] = ..., score: _Optional[float] = ..., title: _Optional[str] = ..., doc_id: _Optional[str] = ..., text: _Optional[str] = ..., tokens: _Optional[int] = ...) -> None: ...

class RetrieveResponse(_message.Message):
    __slots__ = ("chunks",)
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[RetrievedChunk]
    def __init__(self, chunks: _Optional[_Iterable[_Union[RetrievedChunk, _Mapping]]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("query", "chunk_ids", "top_k", "mode", "ratio", "max_new_tokens", "documents", "temperature", "top_p", "seed", "stop")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    CHUNK_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    RATIO_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    query: str
    chunk_ids: _containers.RepeatedScalarFieldContainer[str]
    top_k: int
    mode: str
    ratio: float
    max_new_tokens: int
    documents: _containers.RepeatedCompositeFieldContainer[Document]
    temperature: float
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, query: _Optional[str] = ..., chunk_ids: _Optional[_Iterable[str]] = ..., top_k: _Optional[int] = ..., mode: _Optional[str] = ..., ratio: _Optional[float] = ..., max_new_tokens: _Optional[int] = ..., documents: _Optional[_Iterable[_Union[Document, _Mapping]]] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class QualityCheck(_message.Message):
    __slots__ = ("checked", "kl", "agree", "fell_back")
    CHECKED_FIELD_NUMBER: _ClassVar[int]
    KL_FIELD_NUMBER: _ClassVar[int]
    AGREE_FIELD_NUMBER: _ClassVar[int]
    FELL_BACK_FIELD_NUMBER: _ClassVar[int]
    checked: bool
    kl: float
    agree: bool
    fell_back: bool
    def __init__(self, checked: _Optional[bool] = ..., kl: _Optional[float] = ..., agree: _Optional[bool] = ..., fell_back: _Optional[bool] = ...) -> None: ...

class RequestReport(_message.Message):
    __slots__ = ("mode", "ratio", "chunk_ids", "scores", "prompt_tokens", "chunk_tokens", "chunks_hit", "chunks_missing", "missing_tokens", "tokens_recomputed", "queue_s", "retrieve_s", "load_s", "load_wait_s", "compute_s", "missing_compute_s", "quality", "degraded_tiers", "plan", "load_stall_s", "stalled_layers", "chunk_sources", "documents", "cached_tokens")
    class ChunksHitEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MODE_FIELD_NUMBER: _ClassVar[int]
    RATIO_FIELD_NUMBER: _ClassVar[int]
    CHUNK_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_HIT_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_MISSING_FIELD_NUMBER: _ClassVar[int]
    MISSING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_RECOMPUTED_FIELD_NUMBER: _ClassVar[int]
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    RETRIEVE_S_FIELD_NUMBER: _ClassVar[int]
    LOAD_S_FIELD_NUMBER: _ClassVar[int]
    LOAD_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    MISSING_COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_TIERS_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    LOAD_STALL_S_FIELD_NUMBER: _ClassVar[int]
    STALLED_LAYERS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SOURCES_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    mode: str
    ratio: float
    chunk_ids: _containers.RepeatedScalarFieldContainer[str]
    scores: _containers.RepeatedScalarFieldContainer[float]
    prompt_tokens: int
    chunk_tokens: int
    chunks_hit: _containers.ScalarMap[str, int]
    chunks_missing: int
    missing_tokens: int
    tokens_recomputed: int
    queue_s: float
    retrieve_s: float
    load_s: float
    load_wait_s: float
    compute_s: float
    missing_compute_s: float
    quality: QualityCheck
    degraded_tiers: _containers.RepeatedScalarFieldContainer[str]
    plan: LoadPlan
    load_stall_s: float
    stalled_layers: int
    chunk_sources: _containers.RepeatedScalarFieldContainer[str]
    documents: _containers.RepeatedCompositeFieldContainer[DocumentReport]
    cached_tokens: int
    def __init__(self, mode: _Optional[str] = ..., ratio: _Optional[float] = ..., chunk_ids: _Optional[_Iterable[str]] = ..., scores: _Optional[_Iterable[float]] = ..., prompt_tokens: _Optional[int] = ..., chunk_tokens: _Optional[int] = ..., chunks_hit: _Optional[_Mapping[str, int]] = ..., chunks_missing: _Optional[int] = ..., missing_tokens: _Optional[int] = ..., tokens_recomputed: _Optional[int] = ..., queue_s: _Optional[float] = ..., retrieve_s: _Optional[float] = ..., load_s: _Optional[float] = ..., load_wait_s: _Optional[float] = ..., compute_s: _Optional[float] = ..., missing_compute_s: _Optional[float] = ..., quality: _Optional[_Union[QualityCheck, _Mapping]] = ..., degraded_tiers: _Optional[_Iterable[str]] = ..., plan: _Optional[_Union[LoadPlan, _Mapping]] = ..., load_stall_s: _Optional[float] = ..., stalled_layers: _Optional[int] = ..., chunk_sources: _Optional[_Iterable[str]] = ..., documents: _Optional[_Iterable[_Union[DocumentReport, _Mapping]]] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class DocumentReport(_message.Message):
    __slots__ = ("chunk_ids", "hit", "chunks_computed")
    CHUNK_IDS_FIELD_NUMBER: _ClassVar[int]
    HIT_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_COMPUTED_FIELD_NUMBER: _ClassVar[int]
    chunk_ids: _containers.RepeatedScalarFieldContainer[str]
    hit: bool
    chunks_computed: int
    def __init__(self, chunk_ids: _Optional[_Iterable[str]] = ..., hit: _Optional[bool] = ..., chunks_computed: _Optional[int] = ...) -> None: ...

class LoadPlan(_message.Message):
    __slots__ = ("planned", "ratio", "recompute_chunk_ids", "predicted_load_s", "predicted_compute_s", "reason")
    PLANNED_FIELD_NUMBER: _ClassVar[int]
    RATIO_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTE_CHUNK_IDS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_LOAD_S_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    planned: bool
    ratio: float
    recompute_chunk_ids: _containers.RepeatedScalarFieldContainer[str]
    predicted_load_s: float
    predicted_compute_s: float
    reason: str
    def __init__(self, planned: _Optional[bool] = ..., ratio: _Optional[float] = ..., recompute_chunk_ids: _Optional[_Iterable[str]] = ..., predicted_load_s: _Optional[float] = ..., predicted_compute_s: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class Finish(_message.Message):
    __slots__ = ("reason", "tokens", "seconds")
    REASON_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    reason: str
    tokens: int
    seconds: float
    def __init__(self, reason: _Optional[str] = ..., tokens: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "token_ids", "ttft_s", "report", "finish")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    FINISH_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    ttft_s: float
    report: RequestReport
    finish: Finish
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., ttft_s: _Optional[float] = ..., report: _Optional[_Union[RequestReport, _Mapping]] = ..., finish: _Optional[_Union[Finish, _Mapping]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("chunk_ids",)
    CHUNK_IDS_FIELD_NUMBER: _ClassVar[int]
    chunk_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, chunk_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted", "kv_entries_deleted")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    KV_ENTRIES_DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: _containers.RepeatedScalarFieldContainer[str]
    kv_entries_deleted: int
    def __init__(self, deleted: _Optional[_Iterable[str]] = ..., kv_entries_deleted: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("name", "available", "hits", "misses", "corrupt", "evictions", "promotions", "demotions", "load_s", "bytes", "skipped_writes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    PROMOTIONS_FIELD_NUMBER: _ClassVar[int]
    DEMOTIONS_FIELD_NUMBER: _ClassVar[int]
    LOAD_S_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_WRITES_FIELD_NUMBER: _ClassVar[int]
    name: str
    available: bool
    hits: int
    misses: int
    corrupt: int
    evictions: int
    promotions: int
    demotions: int
    load_s: float
    bytes: int
    skipped_writes: int
    def __init__(self, name: _Optional[str] = ..., available: _Optional[bool] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., corrupt: _Optional[int] = ..., evictions: _Optional[int] = ..., promotions: _Optional[int] = ..., demotions: _Optional[int] = ..., load_s: _Optional[float] = ..., bytes: _Optional[int] = ..., skipped_writes: _Optional[int] = ...) -> None: ...

class GuardStats(_message.Message):
    __slots__ = ("fraction", "max_kl", "checked", "fell_back", "mean_kl", "agreement")
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    MAX_KL_FIELD_NUMBER: _ClassVar[int]
    CHECKED_FIELD_NUMBER: _ClassVar[int]
    FELL_BACK_FIELD_NUMBER: _ClassVar[int]
    MEAN_KL_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    fraction: float
    max_kl: float
    checked: int
    fell_back: int
    mean_kl: float
    agreement: float
    def __init__(self, fraction: _Optional[float] = ..., max_kl: _Optional[float] = ..., checked: _Optional[int] = ..., fell_back: _Optional[int] = ..., mean_kl: _Optional[float] = ..., agreement: _Optional[float] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("model", "fingerprint", "tiers", "degraded_tiers", "queue_depth", "queue_capacity", "active", "requests", "completed", "failed", "cancelled", "rejected", "tokens_generated", "ttft_p50_s", "ttft_p99_s", "tenant_chunks", "guard", "uptime_s", "draining", "loading", "kv_bytes_active", "kv_bytes_limit", "waiting_for_kv", "kv_pool_bytes", "kv_pool_free_bytes", "kv_pool_misses", "device_memory_bytes", "device_memory_peak_bytes", "warmup", "decode_steps", "decode_step_tokens", "decode_step_seconds")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_TIERS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    QUEUE_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    TTFT_P50_S_FIELD_NUMBER: _ClassVar[int]
    TTFT_P99_S_FIELD_NUMBER: _ClassVar[int]
    TENANT_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    GUARD_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    LOADING_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_LIMIT_FIELD_NUMBER: _ClassVar[int]
    WAITING_FOR_KV_FIELD_NUMBER: _ClassVar[int]
    KV_POOL_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_POOL_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_POOL_MISSES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    WARMUP_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEPS_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    fingerprint: str
    tiers: _containers.RepeatedCompositeFieldContainer[TierStats]
    degraded_tiers: _containers.RepeatedScalarFieldContainer[str]
    queue_depth: int
    queue_capacity: int
    active: int
    requests: int
    completed: int
    failed: int
    cancelled: int
    rejected: int
    tokens_generated: int
    ttft_p50_s: float
    ttft_p99_s: float
    tenant_chunks: int
    guard: GuardStats
    uptime_s: float
    draining: bool
    loading: LoadingStats
    kv_bytes_active: int
    kv_bytes_limit: int
    waiting_for_kv: int
    kv_pool_bytes: int
    kv_pool_free_bytes: int
    kv_pool_misses: int
    device_memory_bytes: int
    device_memory_peak_bytes: int
    warmup: WarmupStats
    decode_steps: int
    decode_step_tokens: int
    decode_step_seconds: float
    def __init__(self, model: _Optional[str] = ..., fingerprint: _Optional[str] = ..., tiers: _Optional[_Iterable[_Union[TierStats, _Mapping]]] = ..., degraded_tiers: _Optional[_Iterable[str]] = ..., queue_depth: _Optional[int] = ..., queue_capacity: _Optional[int] = ..., active: _Optional[int] = ..., requests: _Optional[int] = ..., completed: _Optional[int] = ..., failed: _Optional[int] = ..., cancelled: _Optional[int] = ..., rejected: _Optional[int] = ..., tokens_generated: _Optional[int] = ..., ttft_p50_s: _Optional[float] = ..., ttft_p99_s: _Optional[float] = ..., tenant_chunks: _Optional[int] = ..., guard: _Optional[_Union[GuardStats, _Mapping]] = ..., uptime_s: _Optional[float] = ..., draining: _Optional[bool] = ..., loading: _Optional[_Union[LoadingStats, _Mapping]] = ..., kv_bytes_active: _Optional[int] = ..., kv_bytes_limit: _Optional[int] = ..., waiting_for_kv: _Optional[int] = ..., kv_pool_bytes: _Optional[int] = ..., kv_pool_free_bytes: _Optional[int] = ..., kv_pool_misses: _Optional[int] = ..., device_memory_bytes: _Optional[int] = ..., device_memory_peak_bytes: _Optional[int] = ..., warmup: _Optional[_Union[WarmupStats, _Mapping]] = ..., decode_steps: _Optional[int] = ..., decode_step_tokens: _Optional[int] = ..., decode_step_seconds: _Optional[float] = ...) -> None: ...

class WarmupStats(_message.Message):
    __slots__ = ("enabled", "queue", "chunks", "bytes", "skipped", "misses", "dropped", "passes")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    PASSES_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    queue: int
    chunks: int
    bytes: int
    skipped: int
    misses: int
    dropped: int
    passes: int
    def __init__(self, enabled: _Optional[bool] = ..., queue: _Optional[int] = ..., chunks: _Optional[int] = ..., bytes: _Optional[int] = ..., skipped: _Optional[int] = ..., misses: _Optional[int] = ..., dropped: _Optional[int] = ..., passes: _Optional[int] = ...) -> None: ...

class LoadingStats(_message.Message):
    __slots__ = ("enabled", "planned", "chunks_recomputed", "ratio_raised", "read_bytes_per_s", "prefill_s_per_token", "recompute_s_per_token")
    class ReadBytesPerSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    PLANNED_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_RECOMPUTED_FIELD_NUMBER: _ClassVar[int]
    RATIO_RAISED_FIELD_NUMBER: _ClassVar[int]
    READ_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTE_S_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    planned: int
    chunks_recomputed: int
    ratio_raised: int
    read_bytes_per_s: _containers.ScalarMap[str, float]
    prefill_s_per_token: float
    recompute_s_per_token: float
    def __init__(self, enabled: _Optional[bool] = ..., planned: _Optional[int] = ..., chunks_recomputed: _Optional[int] = ..., ratio_raised: _Optional[int] = ..., read_bytes_per_s: _Optional[_Mapping[str, float]] = ..., prefill_s_per_token: _Optional[float] = ..., recompute_s_per_token: _Optional[float] = ...) -> None: ...
