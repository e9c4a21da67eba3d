#!/usr/bin/env bash
# Longer fuzz runs than CI's (which are fixed, derandomized and small): the GGUF / SafeTensors / PEFT
# readers under hypothesis and the HTTP API under schemathesis, with fresh random examples each run.
#   bash bench/fuzz.sh [READER_EXAMPLES=5000] [API_EXAMPLES_PER_ROUTE=2000]
set -euo pipefail
cd "$(dirname "$0")/.."
HYPRJAX_FUZZ_EXAMPLES="${1:-5000}" HYPRJAX_API_FUZZ_EXAMPLES="${2:-2000}" \
  python -m pytest -q tests/test_fuzz_readers.py tests/serve/test_openapi_fuzz.py
