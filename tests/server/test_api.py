"""The HTTP API through FastAPI's TestClient: answers, limits, errors, API key."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from rosim.server import Limits, create_app
from tests.helpers import SENTENCES, tiny_model
from tests.server.conftest import InstrumentedModel, ListIndex

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def client(sim):
    app = create_app(sim, ListIndex(sim, SENTENCES), max_text_chars=40, max_texts=8, max_n=16)
    with TestClient(app) as c:
        yield c


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    err = response.json()["error"]
    assert set(err) >= {"code", "message"} and err["message"]
    return err


# ---------------------------------------------------------------------- answers
def test_encode_matches_the_model(client, sim):
    r = client.post("/encode", json={"texts": ["今天天气不错", "我喜欢北京"]})
    assert r.status_code == 200
    body = r.json()
    assert body["dim"] == sim.model.config.hidden_size
    got = np.array(body["embeddings"])
    np.testing.assert_allclose(got, sim.encode(["今天天气不错", "我喜欢北京"]), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    raw = client.post("/encode", json={"texts": ["今天天气不错"], "normalize": False}).json()["embeddings"][0]
    np.testing.assert_allclose(raw, sim.encode("今天天气不错", normalize=False), atol=1e-5)


def test_similarity_has_the_library_shapes(client, sim):
    a, b = ["今天天气不错", "我喜欢北京"], ["今天天气很好", "我不喜欢北京", "电影不错"]
    matrix = client.post("/similarity", json={"a": a, "b": b}).json()["scores"]
    assert np.shape(matrix) == (2, 3)
    np.testing.assert_allclose(matrix, sim.similarity(a, b), atol=1e-5)
    square = client.post("/similarity", json={"a": a, "b": b[:2]}).json()["scores"]
    assert np.shape(square) == (2, 2)  # equal lengths still give the matrix: shape follows the forms
    one = client.post("/similarity", json={"a": "今天天气不错", "b": b}).json()["scores"]
    np.testing.assert_allclose(one, sim.similarity("今天天气不错", b), atol=1e-5)
    column = client.post("/similarity", json={"a": b, "b": "今天天气不错"}).json()["scores"]
    np.testing.assert_allclose(column, one, atol=1e-5)
    single = client.post("/similarity", json={"a": "电影不错", "b": "电影不错"}).json()["scores"]
    assert single == pytest.approx(1.0, abs=1e-5)


def test_similarity_pairwise_endpoint(client, sim):
    a, b = ["今天天气不错", "我喜欢北京"], ["今天天气很好", "我不喜欢北京"]
    scores = client.post("/similarity/pairwise", json={"a": a, "b": b}).json()["scores"]
    np.testing.assert_allclose(scores, sim.similarity_pairwise(a, b), atol=1e-5)
    assert client.post("/similarity/pairwise", json={"a": "今天", "b": "明天"}).status_code == 422


def test_similar_accepts_text_or_texts_not_both(client):
    one = client.post("/similar", json={"text": "今天天气不错", "n": 4, "k": 2, "seed": 3, "max_new_tokens": 6})
    many = client.post("/similar", json={"texts": "今天天气不错", "n": 4, "k": 2, "seed": 3, "max_new_tokens": 6})
    assert one.status_code == 200 and one.json() == many.json()
    both = client.post("/similar", json={"text": "a", "texts": "b", "n": 4, "k": 2})
    assert both.status_code == 422 and "exactly one of text" in both.text
    assert client.post("/similar", json={"n": 4, "k": 2}).status_code == 422


def test_similar_defaults_are_the_library_defaults(sim):
    from rosim.inference import sim_model

    props = create_app(sim).openapi()["components"]["schemas"]["SimilarRequest"]["properties"]
    assert props["n"]["default"] == sim_model.DEFAULT_N
    assert props["k"].get("default") is None and "default 20" in props["k"]["description"]  # min(20, n)
    assert props["top_p"]["default"] == sim_model.DEFAULT_TOP_P
    assert props["max_new_tokens"]["default"] == sim_model.DEFAULT_MAX_NEW_TOKENS


def test_similar_defaults_follow_a_lower_server_limit(client):
    r = client.post("/similar", json={"text": "今天天气不错", "max_new_tokens": 4})  # this server: max_n=16
    assert r.status_code == 200 and 0 < len(r.json()["results"][0]["similar"]) <= 16


def test_similar_seeded_equals_the_library(client, sim):
    body = {"texts": "今天天气不错", "n": 8, "k": 3, "seed": 7, "max_new_tokens": 12}
    r = client.post("/similar", json=body)
    assert r.status_code == 200
    (item,) = r.json()["results"]
    assert item["text"] == "今天天气不错"
    expected = sim.similar("今天天气不错", n=8, k=3, seed=7, max_new_tokens=12)
    assert [(s["text"], pytest.approx(s["score"], abs=1e-6)) for s in item["similar"]] == expected
    scores = [s["score"] for s in item["similar"]]
    assert scores == sorted(scores, reverse=True) and len(scores) <= 3


def test_similar_several_texts(client):
    r = client.post("/similar", json={"texts": ["今天天气不错", "我喜欢北京"], "n": 4, "k": 2, "max_new_tokens": 6})
    results = r.json()["results"]
    assert [x["text"] for x in results] == ["今天天气不错", "我喜欢北京"]
    assert all(len(x["similar"]) <= 2 for x in results)


def test_search_uses_the_index(client):
    r = client.post("/search", json={"texts": ["今天天气不错", "苹果是红色的"], "k": 2})
    assert r.status_code == 200
    results = r.json()["results"]
    assert results[0]["neighbors"][0]["text"] == "今天天气不错"
    assert results[1]["neighbors"][0]["text"] == "苹果是红色的"
    assert all(len(x["neighbors"]) == 2 for x in results)


def test_search_without_index_is_404(sim):
    with TestClient(create_app(sim)) as c:
        err = error_of(c.post("/search", json={"texts": "今天"}), 404)
        assert err["code"] == "no_index" and "--index" in err["message"]
        assert c.get("/health").json()["index"] is None


def test_health_and_docs(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["model"]["name"] == "tiny-test" and h["index"] == {"type": "ListIndex", "size": 10}
    assert h["limits"]["max_texts"] == 8 and h["auth_required"] is False
    spec = client.get("/openapi.json").json()
    assert {"/encode", "/similarity", "/similar", "/search", "/health"} <= set(spec["paths"])
    texts = spec["components"]["schemas"]["EncodeRequest"]["properties"]["texts"]
    assert texts["maxItems"] == 8 and texts["items"]["maxLength"] == 40  # the limits are in the schema
    docs = client.get("/docs")
    assert docs.status_code == 200 and "openapi.json" in docs.text
    assert "http://" not in docs.text and "https://" not in docs.text  # nothing from a CDN: works offline
    assert client.get("/redoc").status_code == 404


def test_demo_page_is_served(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="query-form"' in page.text and "static/app.js" in page.text
    for asset in ("app.js", "style.css"):
        assert client.get(f"/static/{asset}").status_code == 200


# ---------------------------------------------------------------------- malformed input
@pytest.mark.parametrize("raw,status,code", [
    (b'{"texts": ["a"', 400, "malformed_json"),
    (b"{bad json}", 400, "malformed_json"),
    (b'{"texts": ["\xff\xfe"]}', 400, "malformed_json"),
    (b"", 422, "validation_error"),
    (b"[]", 422, "validation_error"),
    (b"null", 422, "validation_error"),
])
def test_malformed_bodies(client, raw, status, code):
    assert error_of(client.post("/encode", content=raw, headers=JSON), status)["code"] == code


def test_not_json_content_type_is_415(client):
    err = error_of(client.post("/encode", content=b'{"texts": ["a"]}', headers={"Content-Type": "text/plain"}), 415)
    assert "application/json" in err["message"]


@pytest.mark.parametrize("path,body,where", [
    ("/encode", {"texts": "not a list"}, "texts"),
    ("/encode", {"texts": [1, 2]}, "texts.0"),
    ("/encode", {"texts": ["a"], "normalize": "yes"}, "normalize"),
    ("/encode", {"text": ["a"]}, "texts"),
    ("/encode", {"texts": ["a"], "surprise": 1}, "surprise"),
    ("/similar", {"texts": "今天", "n": "5"}, "n"),
    ("/similar", {"texts": "今天", "n": 2.5}, "n"),
    ("/similar", {"texts": "今天", "top_p": "high"}, "top_p"),
    ("/similar", {"texts": {"a": 1}}, "texts"),
    ("/similarity", {"a": None, "b": "x"}, "a"),
    ("/search", {"texts": "今天", "k": True}, "k"),
])
def test_wrong_types_name_the_field(client, path, body, where):
    err = error_of(client.post(path, json=body), 422)
    assert err["code"] == "validation_error"
    assert where in err["message"], err
    assert any(".".join(d["loc"]).startswith(where) for d in err["details"])


@pytest.mark.parametrize("path,body,fragment", [
    ("/encode", {"texts": ["今"] * 9}, "at most 8"),          # texts per request
    ("/encode", {"texts": ["长" * 41]}, "at most 40"),         # text length
    ("/encode", {"texts": []}, "at least 1"),
    ("/encode", {"texts": ["   "]}, "whitespace"),
    ("/similar", {"texts": "今天", "n": 17}, "less than or equal to 16"),
    ("/similar", {"texts": "今天", "n": 0}, "greater than or equal to 1"),
    ("/similar", {"texts": "今天", "n": 4, "k": 5}, "k (5) cannot exceed n (4)"),
    ("/similar", {"texts": "今天", "top_p": 0}, "greater than 0"),
    ("/similar", {"texts": "今天", "max_new_tokens": 65}, "less than or equal to 64"),
    ("/similar", {"texts": "今天", "seed": -1}, "seed"),
    ("/similarity/pairwise", {"a": ["a", "b"], "b": ["c"] * 3}, "different lengths (2 and 3)"),
    ("/search", {"texts": "今天", "k": 101}, "less than or equal to 100"),
])
def test_limits_answer_422_saying_what_was_wrong(client, path, body, fragment):
    err = error_of(client.post(path, json=body), 422)
    assert fragment in err["message"], err


def test_generated_rows_limit(sim):
    app = create_app(sim, limits=Limits(max_gen_rows=10))
    with TestClient(app) as c:
        err = error_of(c.post("/similar", json={"texts": ["今天", "明天"], "n": 6, "k": 1}), 422)
        assert "2 texts x n=6 = 12 candidates exceeds the limit of 10" in err["message"]
        assert c.post("/similar", json={"texts": ["今天"], "n": 6, "k": 1, "max_new_tokens": 4}).status_code == 200


def test_oversize_body_is_413(sim):
    with TestClient(create_app(sim, max_body_bytes=2000)) as c:
        big = {"texts": ["今天天气不错"] * 200}
        err = error_of(c.post("/encode", json=big), 413)
        assert "2000 bytes" in err["message"]

        def chunks():  # no Content-Length: counted while streaming
            yield b'{"texts": ["'
            for _ in range(100):
                yield b"x" * 100
            yield b'"]}'

        error_of(c.post("/encode", content=chunks(), headers=JSON), 413)
        assert c.post("/encode", json={"texts": ["今天"]}).status_code == 200


def test_unknown_path_and_method(client):
    assert error_of(client.get("/nope"), 404)["code"] == "not_found"
    assert error_of(client.get("/encode"), 405)["code"] == "method_not_allowed"


def test_model_input_error_is_422_not_500(sim):
    class Picky(InstrumentedModel):
        def encode(self, texts, **kw):
            from rosim.errors import InputError

            if "坏" in texts:
                raise InputError("the model refuses 坏")
            return super().encode(texts, **kw)

    with TestClient(create_app(Picky(sim))) as c:
        err = error_of(c.post("/encode", json={"texts": ["坏"]}), 422)
        assert err == {"code": "invalid_input", "message": "the model refuses 坏"}


# ---------------------------------------------------------------------- API key
@pytest.fixture(scope="module")
def locked(sim):
    with TestClient(create_app(sim, api_key="s3cret-key")) as c:
        yield c


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer wrong"},
    {"Authorization": "Basic czNjcmV0LWtleQ=="},
    {"Authorization": "Bearer"},
    {"X-API-Key": "s3cret-ke"},
    {"X-API-Key": ""},
])
def test_missing_or_wrong_key_is_401(locked, headers):
    for path, body in (("/encode", {"texts": ["a"]}), ("/similar", {"texts": "a", "n": 2, "k": 1}),
                       ("/similarity", {"a": "a", "b": "b"}), ("/search", {"texts": "a"})):
        r = locked.post(path, json=body, headers=headers)
        err = error_of(r, 401)
        assert err["code"] == "unauthorized" and r.headers["www-authenticate"] == "Bearer"


def test_key_is_checked_before_the_body_is_read(locked):
    assert error_of(locked.post("/encode", content=b"{broken", headers=JSON), 401)["code"] == "unauthorized"
    assert error_of(locked.post("/encode", content=b"x" * (2 << 20), headers=JSON), 401)


@pytest.mark.parametrize("headers", [{"Authorization": "Bearer s3cret-key"}, {"authorization": "bearer s3cret-key"},
                                     {"X-API-Key": "s3cret-key"}])
def test_right_key_passes(locked, headers):
    assert locked.post("/encode", json={"texts": ["a"]}, headers=headers).status_code == 200


def test_open_endpoints_need_no_key(locked):
    h = locked.get("/health")
    assert h.status_code == 200 and h.json()["auth_required"] is True
    assert locked.get("/").status_code == 200 and locked.get("/openapi.json").status_code == 200
    schemes = locked.get("/openapi.json").json()["components"]["securitySchemes"]
    assert {"HTTPBearer", "APIKeyHeader"} <= set(schemes)


def test_empty_key_is_refused(sim):
    from rosim.errors import InputError

    with pytest.raises(InputError):
        create_app(sim, api_key="")


# ---------------------------------------------------------------------- a real vector index
def test_search_with_a_saved_vector_index(sim, tmp_path):
    pytest.importorskip("faiss")
    from rosim.index import VectorIndex
    from rosim.server.indexes import open_index

    VectorIndex.build(sim, SENTENCES).save(tmp_path / "idx")
    index = open_index(tmp_path / "idx", sim)
    with TestClient(create_app(sim, index)) as c:
        assert c.get("/health").json()["index"] == {"type": "ModelIndex", "kind": "exact", "size": len(SENTENCES)}
        r = c.post("/search", json={"texts": ["电影不错", "我喜欢北京"], "k": 3})
        assert r.status_code == 200
        first = [x["neighbors"][0] for x in r.json()["results"]]
        assert [n["text"] for n in first] == ["电影不错", "我喜欢北京"]
        assert all(n["score"] == pytest.approx(1.0, abs=1e-4) for n in first)
        assert all(len(x["neighbors"]) == 3 for x in r.json()["results"])

    other, tok = tiny_model(seed=1)
    from rosim.errors import InputError
    from rosim.inference.sim_model import SimModel

    with pytest.raises(InputError):  # an index refuses a model that did not build it
        open_index(tmp_path / "idx", SimModel(other, tok))
