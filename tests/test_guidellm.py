"""guidellm, the benchmark client of the vLLM project, against our ``/v1`` API with the real default model.

guidellm 0.8.1 sends what vLLM accepts and a strict OpenAI server may refuse: ``stream_options`` with
``continuous_usage_stats``, ``ignore_eos: true``, ``max_completion_tokens`` and chat content as a list of
text parts. A server that rejects any of them fails every request with a 400. Here every request of a
run at 1 and at 4 concurrent streams must succeed with exactly the output length it asked for: guidellm
counts it from our ``usage``, and the server's own ``/metrics`` must count the same tokens.

guidellm pins ``click`` and brings uvicorn's optional event loop and HTTP parser (uvloop, httptools),
which would change how every uvicorn server in the project's environment runs, so it may live in a
virtual environment of its own. The test runs ``$GUIDELLM`` if set, else ``guidellm`` beside this
Python, else ``.venv-guidellm/bin/guidellm`` beside this Python's virtual environment, and is skipped
when there is none. Run with ``-s`` to see guidellm's figures (timings are not asserted).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from labserver.engine.loading import model_folder
from labserver.serve.background import start_fastapi, stop

STREAMS = (1, 4)
REQUESTS = 8  # per stream count
PROMPT_TOKENS, OUTPUT_TOKENS = 64, 32


def guidellm_binary() -> str | None:
    candidates = [os.environ.get("GUIDELLM"), Path(sys.executable).parent / "guidellm",
                  Path(sys.prefix).parent / ".venv-guidellm" / "bin" / "guidellm"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


GUIDELLM = guidellm_binary()
pytestmark = [pytest.mark.model, pytest.mark.timeout(900),
              pytest.mark.skipif(GUIDELLM is None, reason="guidellm is not installed: `make guidellm` installs it "
                                                          "into .venv-guidellm (or set GUIDELLM to its binary)")]


def tokenizer_folder(engine, target: Path) -> Path:
    """The default model's tokenizer files (no weights), for guidellm's ``huggingface_auto`` tokenizer."""
    source = Path(model_folder(engine.config))
    target.mkdir()
    for path in source.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copy(path, target / path.name)
    return target


def server_counts(url: str) -> dict[str, float]:
    samples = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in family.samples:
            reason = s.labels.get("finished_reason")
            samples[s.name + (f"{{{reason}}}" if reason else "")] = s.value
    return samples


def report(benchmark: dict) -> str:
    m = benchmark["metrics"]

    def median(name):
        return m[name]["successful"]["median"]

    totals = m["request_totals"]
    return (f"streams={benchmark['config']['strategy']['streams']} requests ok={totals['successful']} "
            f"errored={totals['errored']} incomplete={totals['incomplete']} | "
            f"median TTFT {median('time_to_first_token_ms'):.0f} ms, "
            f"ITL {median('inter_token_latency_ms'):.1f} ms, request {median('request_latency'):.2f} s | "
            f"output {m['output_tokens_per_second']['successful']['mean']:.1f} tokens/s")


def test_guidellm_gets_every_request_with_its_exact_length(default_engine, tmp_path):
    tokenizer = tokenizer_folder(default_engine, tmp_path / "tokenizer")
    out = tmp_path / "guidellm.json"
    server = start_fastapi(default_engine, port=0, name="guidellm")
    try:
        command = [GUIDELLM, "run", "--backend", f"kind=openai_http,target={server.url}",
                   "--profile", "kind=concurrent", "--override", "profile.streams", ",".join(map(str, STREAMS)),
                   "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
                   "--data", f"kind=synthetic_text,prompt_tokens={PROMPT_TOKENS},output_tokens={OUTPUT_TOKENS}",
                   "--constraint", f"kind=max_requests,count={REQUESTS}",
                   "--output", f"kind=json,path={out}", "--disable-console-interactive"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        run = subprocess.run(command, capture_output=True, text=True, timeout=840, env=env, cwd=tmp_path)
        counts = server_counts(server.url)
    finally:
        stop("guidellm")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    benchmarks = json.loads(out.read_text())["benchmarks"]
    for benchmark in benchmarks:
        print(f"\n[guidellm] {report(benchmark)}", flush=True)
    assert [b["config"]["strategy"]["streams"] for b in benchmarks] == list(STREAMS)
    for benchmark in benchmarks:
        requests = benchmark["requests"]
        failed = requests["errored"] + requests["incomplete"]
        assert not failed, f"{len(failed)} failed, the first with: {failed[0]['info']['error']}"
        assert len(requests["successful"]) == REQUESTS
        assert [r["output_tokens"] for r in requests["successful"]] == [OUTPUT_TOKENS] * REQUESTS
        assert all(r["output_metrics"]["text_tokens"] == OUTPUT_TOKENS for r in requests["successful"])
    # The server's count of what it generated, independent of the usage it reported to guidellm.
    served = REQUESTS * len(STREAMS)
    assert counts["labserver:request_success_total{length}"] == served
    assert counts["labserver:generation_tokens_total"] == served * OUTPUT_TOKENS
