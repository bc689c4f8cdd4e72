"""Property-based fuzzing of the API from its own OpenAPI schema (schemathesis): never a 5xx.

Schemathesis generates valid bodies (within the limits the schema publishes) and invalid ones
(wrong types, out-of-range numbers, missing fields, odd Unicode) for every operation.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="pip install schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error, response_schema_conformance  # noqa: E402

from rosim.inference.sim_model import SimModel  # noqa: E402
from rosim.server import create_app  # noqa: E402
from tests.helpers import SENTENCES, tiny_model  # noqa: E402
from tests.server.conftest import ListIndex  # noqa: E402


def _app():
    model, tok = tiny_model()
    sim = SimModel(model, tok, name="tiny-fuzz")
    # small limits keep generation cheap; the schema carries them, so valid cases stay within them
    return create_app(sim, ListIndex(sim, SENTENCES), max_texts=4, max_text_chars=48, max_n=8,
                      max_gen_length=8, max_k=5, max_wait_ms=0.0)


schema = schemathesis.openapi.from_asgi("/openapi.json", _app())


@schema.parametrize()
@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    case.call_and_validate(checks=[not_a_server_error, response_schema_conformance])
