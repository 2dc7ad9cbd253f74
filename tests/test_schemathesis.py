"""Property-based tests from the app's own OpenAPI schema: no input the schema allows (or breaks) is a 500.

Schemathesis generates bodies for every operation, valid ones and invalid ones, and sends them straight to
the ASGI app. A fake engine with no delays and small limits keeps it fast; ``max_examples`` bounds it.
Checks: no server errors, responses that match their documented schema, status and content type.
"""

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from labserver import EngineConfig, fake_engine  # noqa: E402
from labserver.serve.app import create_app  # noqa: E402

# max_tokens_limit above the request default (128), so valid bodies are mostly accepted; 0 ms steps keep
# even the longest streams instant.
CONFIG = EngineConfig(model="fake", threads=1, max_tokens_limit=256, max_prompt_chars=500, max_prompt_tokens=64)
app = create_app(fake_engine(prefill_ms=0, step_ms=0, config=CONFIG))
schema = schemathesis.openapi.from_asgi("/openapi.json", app)

CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance, content_type_conformance]


@pytest.mark.timeout(300)
@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api(case):
    case.call_and_validate(checks=CHECKS)
