"""The served OpenAPI document is true of the live server: every POST example is accepted and
answered as documented, GET answers, error bodies and stream events match their schemas.

Schemas are checked with JSON Schema 2020-12 against a copy of the document in which every
object schema that lists `properties` admits no others, so a field the server sends but the
document does not name fails here.
"""

import copy
import json
import re

import httpx
import pytest
from jsonschema import Draft202012Validator

from conftest import MODEL

SCHEMA_POINTER = re.compile(r"#/components/schemas/\w+")


def _closed(node):
    """`node` with `additionalProperties: false` on every object schema listing properties."""
    if isinstance(node, dict):
        out = {k: _closed(v) for k, v in node.items()}
        if isinstance(out.get("properties"), dict) and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_closed(v) for v in node]
    return node


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def doc(http):
    r = http.get("/openapi.json")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    return r.json()


@pytest.fixture(scope="module")
def components(doc):
    return _closed(copy.deepcopy(doc["components"]))


def resolve(doc, node):
    """Follows a local `$ref` (responses are shared through components)."""
    ref = node.get("$ref")
    if ref is None:
        return node
    for part in ref.removeprefix("#/").split("/"):
        doc = doc[part]
    return doc


def validate(components, schema, instance):
    """Validates `instance` against `schema`, whose `#/components/...` refs resolve in the
    (closed) components of the document."""
    root = {**schema, "components": components}
    Draft202012Validator(root).validate(instance)


def response_schema(doc, path, method, status, media="application/json"):
    response = resolve(doc, doc["paths"][path][method]["responses"][str(status)])
    return response["content"][media]["schema"]


def post_operations(doc):
    return [(path, item["post"]) for path, item in doc["paths"].items() if "post" in item]


def test_document_is_openapi_3_1_with_valid_schemas(doc):
    assert doc["openapi"] == "3.1.0"
    assert doc["info"]["title"] == "lastmile"
    assert doc["servers"] == [{"url": "/"}]
    for schema in doc["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)
    assert {p for p, _ in post_operations(doc)} == {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/internal/prefill",
    }


def test_every_post_example_is_answered_as_documented(doc, components, http):
    for path, op in post_operations(doc):
        body = op["requestBody"]["content"]["application/json"]
        example = body["example"]
        validate(components, body["schema"], example)
        if "Internal" in op["tags"]:
            # The test server has no internal token: KV transfer is off, as documented (403).
            r = http.post(path, json=example)
            assert r.status_code == 403, (path, r.text)
            validate(components, response_schema(doc, path, "post", 403), r.json())
            continue
        assert example["model"] == MODEL, path
        validate(components, body["schema"], example)
        r = http.post(path, json=example)
        assert r.status_code == 200, (path, r.text)
        assert r.headers["content-type"].startswith("application/json"), path
        validate(components, response_schema(doc, path, "post", 200), r.json())


def test_get_endpoints_answer_as_documented(doc, components, http):
    for url, path in [
        ("/v1/models", "/v1/models"),
        (f"/v1/models/{MODEL}", "/v1/models/{id}"),
        ("/health", "/health"),
        ("/openapi.json", "/openapi.json"),
        ("/internal/prompt-card", "/internal/prompt-card"),
    ]:
        r = http.get(url)
        assert r.status_code == 200, (url, r.text)
        validate(components, response_schema(doc, path, "get", 200), r.json())
    assert http.get("/v1/models").json()["data"][0]["id"] == MODEL

    metrics = http.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]


def test_errors_have_the_documented_shapes(doc, components, http):
    chat_400 = response_schema(doc, "/v1/chat/completions", "post", 400)
    r = http.post(
        "/v1/chat/completions",
        content=b'{"model": "' + MODEL.encode() + b'", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400
    validate(components, chat_400, r.json())
    assert r.json()["error"]["message"].startswith("Invalid JSON body")

    bad = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 5}
    r = http.post("/v1/chat/completions", json=bad)
    assert r.status_code == 400
    validate(components, chat_400, r.json())
    assert r.json()["error"]["param"] == "temperature"

    r = http.get("/v1/models/no-such-model")
    assert r.status_code == 404
    validate(components, response_schema(doc, "/v1/models/{id}", "get", 404), r.json())
    assert r.json()["error"]["code"] == "model_not_found"

    example = doc["paths"]["/v1/messages"]["post"]["requestBody"]["content"]["application/json"]
    unknown = {**example["example"], "model": "no-such-model"}
    r = http.post("/v1/messages", json=unknown)
    assert r.status_code == 404
    validate(components, response_schema(doc, "/v1/messages", "post", 404), r.json())
    assert r.json()["error"]["type"] == "not_found_error"


def sse_events(response):
    """(event name or None, data) of each event of an SSE body."""
    events, name, data = [], None, []
    for line in response.iter_lines():
        if not line:
            if data:
                events.append((name, "\n".join(data)))
            name, data = None, []
        elif line.startswith("event:"):
            name = line[len("event:"):].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:"):].removeprefix(" "))
    if data:
        events.append((name, "\n".join(data)))
    return events


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/messages"])
def test_streamed_events_match_the_schema_the_description_names(doc, components, http, path):
    stream = response_schema(doc, path, "post", 200, "text/event-stream")
    pointer = SCHEMA_POINTER.search(stream["description"]).group(0)
    event_schema = {"$ref": pointer}
    example = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["example"]
    body = {**example, "stream": True}
    if path != "/v1/messages":
        body["stream_options"] = {"include_usage": True}
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/event-stream"
        events = sse_events(r)
    assert len(events) >= 3, events
    if path == "/v1/messages":
        assert events[-1][0] == "message_stop"
    else:
        assert events[-1] == (None, "[DONE]")
        events = events[:-1]
        assert json.loads(events[-1][1])["usage"]["total_tokens"] > 0
    for name, data in events:
        payload = json.loads(data)
        validate(components, event_schema, payload)
        if path == "/v1/messages":
            assert name == payload["type"]
