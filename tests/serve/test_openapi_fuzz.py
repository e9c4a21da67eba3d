"""schemathesis against the server's own /openapi.json: generated requests (valid and invalid)
for every route, in process over ASGI, on the fake engine with two adapters loaded. Each answer
must be no 5xx, in a documented status, media type and shape (`call_and_validate`'s checks).

CI-sized and fixed: 60 cases per route; `bash bench/fuzz.sh` runs longer, freshly random ones.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from tests.deps import need

schemathesis = need("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from hyprjax.config import ModelConfig  # noqa: E402
from hyprjax.learn.learner import Learner  # noqa: E402
from hyprjax.serve.app import create_app  # noqa: E402
from tests.serve.fake_engine import FakeEngine  # noqa: E402

fake = FakeEngine(max_model_len=4096)
fake.lora.update({"support": "/adapters/support", "legal": "/adapters/legal"})
# The learning routes too, over a learner with no round to run (the fuzzer's ids are unknown).
CFG = ModelConfig(arch="qwen3", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                  num_kv_heads=1, head_dim=8)
learner = Learner(Path(tempfile.mkdtemp(prefix="hyprjax-fuzz-")) / "learn.db", ["tutor"], "/nonexistent", CFG)
app = create_app(fake, learner=learner)

EXAMPLES = int(os.environ.get("HYPRJAX_API_FUZZ_EXAMPLES", "60"))
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize="HYPRJAX_API_FUZZ_EXAMPLES" not in os.environ,
          suppress_health_check=list(HealthCheck))
def test_every_route_conforms_to_its_schema(case):
    # positive_data_acceptance (every schema-valid body gets 2xx) is left out: the API has rules a
    # JSON schema cannot state (lora_weights as many as lora_adapters, top_logprobs only with
    # logprobs, prompt + max_tokens within the context), and those requests rightly get 400.
    case.call_and_validate(excluded_checks=[schemathesis.checks.positive_data_acceptance])
