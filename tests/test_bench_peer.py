"""bench-peer's pure parts: the CPU cache key, llama-server's /completion stream, the ratios, the
agreement with llama-server's own timings. Nothing here builds or starts llama.cpp."""
import json

import httpx
import pytest

from labserver.measure import peer
from labserver.measure.bench_peer import figures, problems, ratios, timings_agreement
from labserver.measure.stats import aggregate_tokens_per_s
from labserver.measure.client import stream_generate
from labserver.measure.protocols import LLAMA_CPP
from labserver.measure.trace import Trace

X86 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu vme ht sse4_2 avx avx2 fma f16c avx512f avx512_vnni amx_int8 amx_tile
processor\t: 1
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu vme ht sse4_2 avx avx2 fma f16c avx512f avx512_vnni amx_int8 amx_tile
"""
ARM = """processor\t: 0
BogoMIPS\t: 48.00
Features\t: fp asimd evtstrm aes asimdhp cpuid asimddp sve i8mm
CPU implementer\t: 0x41
"""


def test_cpuinfo_keeps_the_simd_flags_and_the_model_name():
    cpu = peer.parse_cpuinfo(X86, machine="x86_64")
    assert cpu.model == "Intel(R) Xeon(R) Processor"
    assert cpu.flags == ("amx_int8", "amx_tile", "avx", "avx2", "avx512_vnni", "avx512f", "f16c", "fma", "sse4_2")
    arm = peer.parse_cpuinfo(ARM, machine="aarch64")
    assert arm.flags == ("asimd", "asimddp", "asimdhp", "i8mm", "sve") and arm.model == "unknown CPU"


def test_cache_key_changes_with_what_a_native_build_depends_on_only():
    base = peer.parse_cpuinfo(X86, machine="x86_64").key
    assert base == peer.parse_cpuinfo(X86, machine="x86_64").key and base.startswith("x86_64-")
    assert peer.parse_cpuinfo(X86.replace(" ht", ""), machine="x86_64").key == base        # not a SIMD flag
    assert peer.parse_cpuinfo(X86.replace(" amx_int8", ""), machine="x86_64").key != base  # the AMX crash
    assert peer.parse_cpuinfo(X86.replace("Xeon(R)", "Core(TM)"), machine="x86_64").key != base
    assert peer.parse_cpuinfo(X86, machine="aarch64").key != base


def test_cache_dir_names_the_version_and_the_cpu(tmp_path):
    cpu = peer.parse_cpuinfo(X86, machine="x86_64")
    assert peer.cache_dir(cpu, root=tmp_path) == tmp_path / f"llama.cpp-{peer.VERSION}-{cpu.key}"


def _sse(events):
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events)  # llama-server sends no [DONE] here


TIMINGS = {"cache_n": 0, "prompt_n": 3, "prompt_ms": 20.0, "predicted_n": 3, "predicted_ms": 10.0,
           "predicted_per_token_ms": 5.0}
STREAM = [{"content": " Once", "tokens": [11], "stop": False, "tokens_predicted": 1},
          {"content": " upon", "tokens": [12], "stop": False, "tokens_predicted": 2},
          {"content": "", "tokens": [13], "stop": False, "tokens_predicted": 3},  # text held back (a stop word?)
          {"content": "", "tokens": [], "stop": True, "stop_type": "limit", "tokens_predicted": 3,
           "tokens_evaluated": 3, "timings": TIMINGS}]


def test_completion_stream_through_the_client():
    sent = {}

    def handler(request: httpx.Request) -> httpx.Response:
        sent.update(json.loads(request.content), path=request.url.path)
        return httpx.Response(200, text=_sse(STREAM), headers={"content-type": "text/event-stream"})

    with httpx.Client(transport=httpx.MockTransport(handler)) as http:
        trace = stream_generate("http://peer", [1, 2, 3], 3, 0.0, protocol=LLAMA_CPP, client=http,
                                ignore_eos=True, cache_prompt=False)
    assert sent == {"path": "/completion", "prompt": [1, 2, 3], "n_predict": 3, "temperature": 0.0, "stream": True,
                    "ignore_eos": True, "cache_prompt": False}
    assert trace.ok and trace.n_tokens == 3 and trace.token_ids == [11, 12, 13] and trace.text == " Once upon"
    assert trace.finish_reason == "length" and trace.timings == TIMINGS
    assert trace.usage == {"prompt_tokens": 3, "completion_tokens": 3}


def _trace(sent_s, arrivals, **kw):
    t = Trace(prompt=kw.pop("prompt", "p"), sent_s=sent_s, arrival_ms=list(arrivals), tokens=["x"] * len(arrivals),
              token_ids=[None] * len(arrivals), step_ms=[None] * len(arrivals), batch=[None] * len(arrivals))
    for k, v in kw.items():
        setattr(t, k, v)
    return t


def test_aggregate_tokens_per_s_spans_first_send_to_last_token():
    # 4 tokens from 0.0 s to 0.4 s, 4 more from 0.1 s to 0.1 + 0.3 s: 8 tokens over 0.4 s.
    traces = [_trace(0.0, [100, 200, 300, 400]), _trace(0.1, [100, 200, 250, 300])]
    assert aggregate_tokens_per_s(traces) == pytest.approx(20.0)
    assert aggregate_tokens_per_s([]) is None


def test_figures_and_ratios():
    ours = figures([_trace(0, [50, 60, 70, 80]), _trace(1, [70, 80, 92, 104])],
                   [[_trace(0, [100, 200]), _trace(0, [100, 200])]])
    assert ours["step_ms"] == 10.0 and ours["prefill_ms"] == 60.0  # gaps 10,10,10,10,12,12; TTFTs 50, 70
    assert ours["tokens_per_s_8"] == pytest.approx(20.0)
    peer_1 = {"step_ms": 5.0, "prefill_ms": 30.0, "server_prefill_ms": 25.0, "tokens_per_s_8": None}
    peer_8 = {"tokens_per_s_8": 40.0}
    ours["server_prefill_ms"] = 50.0
    assert ratios(ours, peer_1, peer_8) == {"P6": 2.0, "P6_prefill": 2.0, "P6_prefill_server": 2.0, "P7_peer": 0.5}


def test_timings_agreement_checks_what_llama_servers_timers_span():
    n = 65  # 64 decode steps of 5 ms after a 20 ms prompt; llama-server's predicted_ms spans all 64
    timings = {"prompt_ms": 20.0, "predicted_ms": 320.0, "predicted_per_token_ms": 5.0}
    good = _trace(0, [22.0 + 5.0 * i for i in range(n)], timings=timings)  # 2 ms outside the timers
    late_first = _trace(0, [27.0] + [22.0 + 5.0 * i for i in range(1, n)], timings=timings)  # waited one step
    slow_client = _trace(0, [22.0 + 5.5 * i for i in range(n)], timings=timings)  # 32 ms more first to last
    impossible = _trace(0, [15.0 + 5.0 * i for i in range(n)], timings=timings)  # a token before its prompt
    a = timings_agreement([good, late_first, slow_client, impossible])
    assert a["requests"] == 4 and a["causal"] == 3 and a["span_within"] == 3
    assert a["span_bounds_ms"] == (-15.0, 10.0)  # -(2 x 5 + one 5 ms step), 2 x 5
    assert a["p50_outside_timers_ms"] == 2.0 and a["p50_ttft_minus_prompt_ms"] == 2.0  # 2, 7, 2, -5


def test_problems_name_short_answers_cache_hits_and_other_prompt_tokens():
    ok = _trace(0, range(4), usage={"prompt_tokens": 3}, prompt=[1, 2, 3])
    assert problems("peer", [ok], 4, len) == []
    short = _trace(0, range(3), prompt=[1, 2, 3])
    cached = _trace(0, range(4), timings={"cache_n": 2}, prompt=[1, 2, 3])
    retokenized = _trace(0, range(4), usage={"prompt_tokens": 4}, prompt=[1, 2, 3])
    found = problems("peer", [short, cached, retokenized], 4, len)
    assert len(found) == 3 and "shorter" in found[0] and "cache" in found[1] and "prompt tokens" in found[2]
    ours_cached = _trace(0, range(4), timings={"cached_tokens": 24}, prompt=[1, 2, 3])
    assert problems("ours", [ok, ours_cached], 4) == ["ours: prefix-cache hits (timings.cache_n or cached_tokens > 0)"]


def test_a_build_that_crashes_is_rebuilt_without_amx(monkeypatch, tmp_path):
    built, logged = [], []

    def fake_build(amx=True, log=print):
        built.append(amx)
        return tmp_path / ("build" if amx else "build-noamx") / "llama-server"

    def fake_smoke(binary, gguf, extra=()):
        if binary.parent.name == "build":
            raise peer.PeerCrashed(-4, "Illegal instruction")

    monkeypatch.setattr(peer, "build", fake_build)
    monkeypatch.setattr(peer, "_smoke", fake_smoke)
    binary, note, extra = peer.ensure_server(tmp_path / "m.gguf", log=logged.append)
    assert built == [True, False] and binary.parent.name == "build-noamx" and extra == ()
    assert peer.NO_AMX in note and any(peer.NO_AMX in line for line in logged)


def test_a_build_that_crashes_without_amx_too_runs_without_repacking(monkeypatch, tmp_path):
    tried = []

    def fake_smoke(binary, gguf, extra=()):
        tried.append((binary.parent.name, extra))
        if extra != peer.NO_REPACK:
            raise peer.PeerCrashed(-11, "Segmentation fault")

    monkeypatch.setattr(peer, "build", lambda amx=True, log=print: tmp_path / ("build" if amx else "build-noamx") / "x")
    monkeypatch.setattr(peer, "_smoke", fake_smoke)
    binary, note, extra = peer.ensure_server(tmp_path / "m.gguf", log=lambda *a: None)
    assert tried == [("build", ()), ("build-noamx", ()), ("build-noamx", peer.NO_REPACK)]
    assert extra == peer.NO_REPACK and "--no-repack" in note and "slower" in note


def test_outcome_takes_p6_per_round_and_p7_from_the_n_stream_server():
    from labserver.measure.bench_peer import STREAMS, outcome
    from labserver.measure.targets import Target
    from labserver.measure.client import LABSERVER

    def target(name, gap, protocol, rounds):
        t = Target(name, "http://x", protocol, str, {})
        t.single = [_trace(0, [10 + gap * i for i in range(4)], prompt=[1]) for _ in range(2)]  # 2 rounds x 1 run
        t.single[1] = _trace(0, [10 + 2 * gap * i for i in range(4)], prompt=[1])               # round 2: slower
        t.rounds = [[_trace(0, [100 * rate] * 4, prompt=[1]) for _ in range(STREAMS)] for rate in rounds]
        return t

    ours = target("ours", 10.0, LABSERVER, [2, 1])          # 32 tokens over 0.2 s, then 0.1 s
    peer_1 = target("np1", 5.0, LLAMA_CPP, [])
    peer_n = target("np8", 5.0, LLAMA_CPP, [1, 1])
    out = outcome([ours, peer_1, peer_n], (), runs=1, max_tokens=4)
    assert out["P6_rounds"] == [2.0, 2.0] and out["P7_peer_rounds"] == [0.5, 1.0]
    assert out["P6"] == 2.0 and out["P7_peer"] == 0.75 and out["problems"] == []
