"""The OpenAI-compatible HTTP API of a real `kvblend serve --http-port`, driven by the official `openai`
client (issue 20): chat completions with inline `documents`, streamed and whole, whose second identical
request blends every document from cache and answers sooner; bad input gets the matching HTTP status and
an OpenAI-shaped error; the gRPC API takes the same inline documents and the ids they got."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid

import openai
import pytest
from tests.helpers.service import DOCUMENTS, ServerProcess

from services.bench.launch import free_port
from services.serving import errors
from services.serving.openai_http import chat_request, error_response
from services.serving.requests import DocumentIn, GenerateParams

ALICE = "alice-token-0123456789abcdef"
MAX_CHARS = 4000


@pytest.fixture(scope="module")
def server(service_model_dir, tmp_path_factory):
    http_port, metrics_port = free_port(), free_port()
    server = ServerProcess(tmp_path_factory.mktemp("openai-server"), service_model_dir, {
        "server": {"chunk_tokens": 128, "default_max_new_tokens": 8, "max_inline_documents": 4,
                   "max_inline_document_chars": MAX_CHARS, "metrics_port": metrics_port},
        "store": {"cpu_bytes": 64 << 20, "disk_path": ""},
        "auth": {"tokens": {ALICE: "alice"}},
    }, flags=("--http-port", str(http_port)))
    server.base_url = f"http://127.0.0.1:{http_port}/v1"
    server.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    yield server
    assert server.stop() == 0, server.stderr()[-3000:]


@pytest.fixture(scope="module")
def api(server):
    return openai.OpenAI(base_url=server.base_url, api_key=ALICE, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(api):
    return api.models.list().data[0].id


def _documents():
    """Passages no earlier request used (a fresh tag in each), so the first request computes them all."""
    tag = uuid.uuid4().hex[:8]
    return [{"title": f"{d['title']} {tag}", "text": d["text"] * 3} for d in DOCUMENTS]


def _ask(api, model, documents, **kwargs):
    kwargs.setdefault("max_tokens", 6)
    return api.chat.completions.create(model=model, messages=[{"role": "user", "content": "Where is the Seine?"}],
                                       extra_body={"documents": documents}, **kwargs)


def test_the_models_endpoint_lists_the_served_model(api, server):
    models = api.models.list().data
    assert len(models) == 1 and models[0].id == server.process.args[server.process.args.index("--model") + 1]


def test_a_second_identical_completion_hits_every_document_and_answers_sooner(api, model):
    documents = _documents()
    first, second = _ask(api, model, documents), _ask(api, model, documents)
    reports = [c.model_extra["kvblend"]["report"] for c in (first, second)]
    assert [d["hit"] for d in reports[0]["documents"]] == [False] * len(documents)
    assert [d["hit"] for d in reports[1]["documents"]] == [True] * len(documents)
    assert second.model_extra["kvblend"]["ttft_s"] < first.model_extra["kvblend"]["ttft_s"]
    assert second.choices[0].message.content == first.choices[0].message.content
    assert second.choices[0].message.role == "assistant" and second.object == "chat.completion"
    usage = second.usage
    assert usage.prompt_tokens == reports[1]["prompt_tokens"] and 1 <= usage.completion_tokens <= 6
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens_details.cached_tokens
    assert usage.prompt_tokens_details.cached_tokens >= reports[1]["chunk_tokens"]


def _stream(api, model, documents):
    chunks = list(_ask(api, model, documents, stream=True, stream_options={"include_usage": True}))
    return chunks, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_a_streamed_completion_carries_the_report_first_and_the_usage_last(api, model):
    documents = _documents()
    (first, text), (second, text_again) = _stream(api, model, documents), _stream(api, model, documents)
    whole = _ask(api, model, documents)
    assert text == text_again == whole.choices[0].message.content
    extras = [chunks[0].model_extra["kvblend"] for chunks in (first, second)]
    assert all(not d["hit"] for d in extras[0]["report"]["documents"])
    assert all(d["hit"] for d in extras[1]["report"]["documents"])
    assert extras[1]["ttft_s"] < extras[0]["ttft_s"]
    assert all("kvblend" not in c.model_extra for c in second[1:])
    assert second[0].choices[0].delta.role == "assistant" and second[0].object == "chat.completion.chunk"
    finished = [c.choices[0].finish_reason for c in second if c.choices and c.choices[0].finish_reason]
    assert finished in (["stop"], ["length"])
    assert second[-1].choices == [] and second[-1].usage.completion_tokens >= 1


def test_a_seeded_sampled_completion_is_reproducible(api, model):
    documents = _documents()
    answers = [_ask(api, model, documents, temperature=1.0, seed=seed, max_tokens=12).choices[0].message.content
               for seed in (7, 7, 8, 9)]
    assert answers[0] == answers[1] and len(set(answers)) > 1


def test_a_stop_string_ends_the_answer_before_it(api, model):
    documents = _documents()
    full = _ask(api, model, documents, max_tokens=12).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = _ask(api, model, documents, max_tokens=12, stop=[stop])
    assert cut.choices[0].message.content == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("case, status, words", [
    ("empty messages", 400, "messages is empty"),
    ("unknown model", 404, "does not exist"),
    ("negative max_tokens", 400, "max_tokens -1"),
    ("oversized document", 400, "max_inline_document_chars"),
    ("wrong token", 401, "invalid bearer token"),
    ("unknown chunk id", 404, "unknown chunk id 'feedfacefeedface'"),
    ("deadline", 504, "deadline passed"),
])
def test_bad_input_gets_its_status_and_an_openai_shaped_error(server, api, model, case, status, words):
    client, kwargs = api, {"model": model, "messages": [{"role": "user", "content": "Hi"}]}
    if case == "empty messages":
        kwargs["messages"] = []
    elif case == "unknown model":
        kwargs["model"] = "gpt-nonexistent"
    elif case == "negative max_tokens":
        kwargs["max_tokens"] = -1
    elif case == "oversized document":
        kwargs["extra_body"] = {"documents": [{"title": "Long", "text": "x" * (MAX_CHARS + 1)}]}
    elif case == "wrong token":
        client = openai.OpenAI(base_url=server.base_url, api_key="wrong-token-0123456789", max_retries=0)
    elif case == "unknown chunk id":
        kwargs["extra_body"] = {"chunk_ids": ["feedfacefeedface"]}
    elif case == "deadline":  # a long answer that cannot finish in 50 ms
        kwargs.update(max_tokens=900, extra_body={"timeout_s": 0.05})
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(**kwargs)
    err = raised.value
    assert err.status_code == status
    body = err.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert words in body["error"]["message"]


def test_http_calls_are_counted_in_the_metrics_under_their_grpc_status_names(server, api, model):
    _ask(api, model, _documents())
    with pytest.raises(openai.BadRequestError):
        api.chat.completions.create(model=model, messages=[])
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    chat = 'method="POST /v1/chat/completions"'
    assert f'kvblend_rpcs_total{{code="OK",{chat}}}' in text
    assert f'kvblend_rpcs_total{{code="INVALID_ARGUMENT",{chat}}}' in text
    assert 'kvblend_rpcs_total{code="OK",method="GET /v1/models"}' in text


def test_a_body_that_is_not_json_is_a_400_in_the_openai_shape(server):
    request = urllib.request.Request(server.base_url + "/chat/completions", data=b"{not json", method="POST",
                                     headers={"Authorization": f"Bearer {ALICE}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=30)
    assert raised.value.code == 400
    assert "not JSON" in json.loads(raised.value.read())["error"]["message"]


def test_grpc_inline_documents_then_the_same_passages_by_id_give_the_same_answer(server):
    documents = _documents()
    with server.client(token=ALICE) as client:
        client.wait_ready(30)
        inline = client.answer("Where is the Seine?", documents=documents, max_new_tokens=8)
        ids = [cid for d in inline.report.documents for cid in d.chunk_ids]
        assert len(ids) == len(documents) and not any(d.hit for d in inline.report.documents)
        by_id = client.answer("Where is the Seine?", chunk_ids=ids, max_new_tokens=8)
        assert list(by_id.report.chunk_ids) == ids and by_id.report.chunks_missing == 0
        assert by_id.token_ids == inline.token_ids and by_id.text == inline.text


def test_grpc_a_seeded_sample_is_the_same_tokens_every_time(server):
    documents = _documents()
    with server.client(token=ALICE) as client:
        client.wait_ready(30)
        answers = [client.answer("Name a mountain.", documents=documents, max_new_tokens=12, temperature=1.0,
                                 top_p=0.95, seed=seed).token_ids for seed in (3, 3, 4, 5)]
    assert answers[0] == answers[1] and len({tuple(a) for a in answers}) > 1


def test_a_stream_the_client_closes_stops_generating(server, api, model):
    stream = api.chat.completions.create(model=model, messages=[{"role": "user", "content": "Tell a long story."}],
                                         max_tokens=900, stream=True)
    for _, _chunk in zip(range(3), stream):
        pass
    stream.close()
    with server.client(token=ALICE) as client:
        deadline = time.monotonic() + 10
        while (stats := client.stats()).cancelled < 1 or stats.active:
            assert time.monotonic() < deadline, f"still generating: {stats.active} active, {stats.cancelled} cancelled"
            time.sleep(0.1)
        time.sleep(0.5)
        assert client.stats().tokens_generated == stats.tokens_generated


@pytest.mark.parametrize("error, status, kind", [
    (errors.InvalidArgument("x"), 400, "invalid_request_error"),
    (errors.Unauthenticated("x"), 401, "authentication_error"),
    (errors.PermissionDenied("x"), 403, "permission_error"),
    (errors.NotFound("x"), 404, "not_found_error"),
    (errors.Overloaded("x"), 429, "rate_limit_exceeded"),
    (errors.Unavailable("x"), 503, "service_unavailable"),
    (errors.DeadlineExceeded("x"), 504, "timeout"),
])
def test_each_engine_error_has_its_http_status_and_openai_type(error, status, kind):
    assert error_response(error) == (status, {"error": {"message": "x", "type": kind, "param": None, "code": None}})


@pytest.mark.parametrize("change, words", [
    ({"messages": [{"role": "robot", "content": "Hi"}]}, "messages[0].role \"robot\""),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"max_tokens": 0}, "max_tokens 0"),
    ({"max_tokens": "9"}, "max_tokens \"9\" is not an integer"),
    ({"temperature": True}, "temperature true is not a number"),
    ({"n": 2}, "n 2"),
    ({"stop": [1]}, "stop is neither"),
    ({"documents": [{"title": "t"}]}, "documents[0]"),
    ({"model": None}, "model is required"),
])
def test_a_bad_chat_field_is_refused_naming_it(change, words):
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], **change}
    with pytest.raises(errors.InvalidArgument) as raised:
        chat_request(body, "m")
    assert words in str(raised.value)


def test_a_chat_body_becomes_the_engine_s_parameters():
    chat = chat_request({"model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                         "documents": [{"title": "T", "text": "body"}], "mode": "reuse", "ratio": 0.3,
                         "max_completion_tokens": 5, "temperature": 0.5, "top_p": 0.9, "seed": 4, "stop": "\n",
                         "stream": True, "stream_options": {"include_usage": True}}, "m")
    assert chat.stream and chat.include_usage
    assert chat.params == GenerateParams(messages=(("system", "Be brief."), ("user", "Hi")),
                                         documents=(DocumentIn("body", "T"),), mode="reuse", ratio=0.3,
                                         max_new_tokens=5, temperature=0.5, top_p=0.9, seed=4, stop=("\n",))
