"""The weight-format registry and ``--quant auto``: the fastest measured route among those with float32's tokens.

The ranking is checked by hand on injected timings (the AVX2 laptop's figures must give fp16, the
AVX-512 machine's q4_1); the measurement end to end on a tiny llama saved as a folder, whose file is read
back at the next start instead of measuring again; and a route made to differ from float32 is never
chosen, however fast it is made to look.
"""

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

from labserver import Engine, EngineConfig, SamplingParams, config as config_module
from labserver.engine import calibrate
from labserver.engine.calibrate import Trial, choose, measure, rank
from labserver.engine.runners import make_runner
from labserver.model import formats, kernels
from labserver.model.checkpoint import Checkpoint
from labserver.model.linear import Dense, joined
from labserver.model.llama import LeanLlama
from tests.test_blockquant import grid_llama
from tests.test_lean_llama import lean_logits, tiny_llama

AUTO = [f.name for f in formats.auto_candidates()]


def test_config_takes_the_registry_names_and_one_spelling_of_none():
    assert config_module.QUANTS == ("auto", *formats.NAMES)
    assert EngineConfig(quant="none").quant == "none"
    for bad in (None, "None", "float32"):
        with pytest.raises(ValueError, match="quant must be one of"):
            EngineConfig(quant=bad)
    with pytest.raises(ValueError, match="quant must be one of"):
        LeanLlama(tiny_llama(), quant=None)


def test_the_registry_says_what_each_format_is():
    assert AUTO == ["q4_1", "fp16", "none"]  # w4a8 changes the tokens: opt-in only
    assert [n for n, f in formats.FORMATS.items() if f.needs_compiler] == ["q4_1", "w4a8"]
    assert formats.activation_dtype("none", "bfloat16") == torch.bfloat16
    assert formats.activation_dtype("none", "bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="float32 activations"):
        formats.get("fp16").check(torch.bfloat16)


@pytest.mark.parametrize("quant", formats.NAMES)
def test_every_format_builds_and_runs_close_to_float32(quant):
    """On a model whose matrices sit on the block grids: exact formats within summation order, the others
    within their rounding (bfloat16 activations: ~3 significant digits, 8-bit: ~2)."""
    grid = grid_llama(tie_word_embeddings=False)
    ids = [5, 17, 99, 3, 42, 7, 11, 8]
    ref = lean_logits(LeanLlama(grid, max_len=16), ids, 5)
    lean = LeanLlama(grid, quant=quant, dtype=formats.activation_dtype(quant, "float32"), max_len=16)
    got = lean_logits(lean, ids, 5)
    assert (lean.fused is not None) == formats.get(quant).blocks
    tolerance = 1e-5 if formats.get(quant).exact else 0.05
    assert (got - ref).norm() / ref.norm() < tolerance


def test_rank_picks_the_fastest_route_that_agrees():
    # The AVX2 laptop (portable C for the blocks): float16 is the fastest exact route there.
    assert rank({"q4_1": Trial(81.0, True), "fp16": Trial(20.6, True), "none": Trial(36.5, True)}) == "fp16"
    # The AVX-512 machine: the blocks are.
    assert rank({"q4_1": Trial(7.9, True), "fp16": Trial(20.1, True), "none": Trial(35.8, True)}) == "q4_1"
    # The fastest one changes the tokens: never chosen; no compiler: q4_1 was not run.
    assert rank({"q4_1": Trial(None, False, "no C kernels"), "fp16": Trial(5.0, False, "differ"),
                 "none": Trial(35.8, True)}) == "none"
    assert rank({"q4_1": Trial(9.0, True), "fp16": Trial(9.0, True), "none": Trial(35.8, True)}) == "q4_1"  # tie
    assert rank({"none": Trial(None, False, "failed")}) is None


def fake_routes(timings: dict, tokens: dict | None = None):
    """A ``build`` that records what it built and a ``trial`` that returns the given tokens and ms."""
    built = []

    def build(quant):
        built.append(quant)
        return SimpleNamespace(quant=quant)

    def trial(lean, steps):
        return (tokens or {}).get(lean.quant, [1, 2, 3]), timings[lean.quant]

    return built, build, trial


def test_measure_excludes_a_route_whose_tokens_differ_and_keeps_the_winner():
    built, build, trial = fake_routes({"q4_1": 40.0, "fp16": 1.0, "none": 30.0}, tokens={"fp16": [1, 2, 4]})
    trials, kept = measure(build, trial)
    assert sorted(built) == sorted(AUTO) and list(trials) == AUTO
    assert not trials["fp16"].agrees and "at step 2" in trials["fp16"].why_not
    assert rank(trials) == "none" and kept.quant == "none"


def test_without_a_compiler_q4_1_is_not_a_candidate(monkeypatch):
    monkeypatch.setattr(kernels, "available", lambda: (False, "no C compiler (cc or gcc) on PATH"))
    built, build, trial = fake_routes({"q4_1": 1.0, "fp16": 20.0, "none": 30.0})
    trials, kept = measure(build, trial)
    assert "q4_1" not in built and "no C compiler" in trials["q4_1"].why_not and kept.quant == "fp16"


@pytest.fixture
def folder(tmp_path):
    """A llama on the block grids saved as a model folder: a model with files, so its route is cached."""
    grid_llama(tie_word_embeddings=False).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_the_measured_route_is_cached_and_read_at_the_next_start(folder, tmp_path, monkeypatch, capfd):
    config = EngineConfig(threads=2, max_batch=2, cache_dir=str(tmp_path / "cache"))
    first = make_runner(Checkpoint(folder), config, 64)
    assert first.route.quant in AUTO and "measured now" in first.route.why
    assert set(first.route.measured_ms) == set(AUTO)  # the compiler is here, and every route agrees here
    exact = {n: ms for n, ms in first.route.measured_ms.items() if n not in first.route.excluded}
    assert first.route.measured_ms[first.route.quant] == min(exact.values())
    assert first.lean.cache.num_blocks == 2 * first.lean.cache.blocks_for(64)  # the winner got the engine's pool
    assert first.free_slots == 2
    assert f"weights {first.route.quant}" in capfd.readouterr().err  # the startup log says which and why
    files = list((tmp_path / "cache" / "routes").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["quant"] == first.route.quant

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(calibrate, "measure", no_measuring)
    again = make_runner(Checkpoint(folder), config, 64)
    assert again.route.quant == first.route.quant and again.route.measured_ms == first.route.measured_ms
    assert "first start" in again.route.why and str(files[0]) in again.route.why
    with pytest.raises(AssertionError, match="measured again"):  # another thread count is another key
        make_runner(Checkpoint(folder), dataclasses.replace(config, threads=1), 64)


def test_auto_never_picks_a_route_whose_tokens_differ_however_fast(folder, tmp_path, monkeypatch):
    """fp16 made wrong (its output matrix's rows shifted by one: every greedy token moves) and made to look
    a thousand times faster than anything: the real check still excludes it."""
    def shifted(name, parts, dtype, store):
        w = joined(parts)
        return Dense(w.roll(1, 0) if name == formats.HEAD else w, dtype)

    monkeypatch.setitem(formats.FORMATS, "fp16", dataclasses.replace(formats.FORMATS["fp16"], build=shifted))

    def trial(lean, steps):
        tokens, ms = calibrate.greedy_trial(lean, steps)
        return tokens, ms / 1000 if lean.quant == "fp16" else ms

    model, config = Checkpoint(folder), EngineConfig(threads=2, cache_dir=str(tmp_path / "cache"))
    route, kept = choose(model, config, lambda q: LeanLlama(model, quant=q, max_len=64), trial)
    assert route.quant != "fp16" and "differ from float32's at step 0" in route.excluded["fp16"]
    assert kept.quant == route.quant


def test_explicit_and_transformers_routes_say_why(tiny_engine):
    assert Engine(tiny_engine.source, tiny_engine.tokenizer, EngineConfig(quant="none", threads=1)).route == {
        "quant": "none", "why": "--quant none asked for", "measured_ms": {}, "excluded": {},
        "threads": 1, "threads_why": "--threads 1 asked for"}
    bf16 = make_runner(tiny_engine.source, EngineConfig(dtype="bfloat16"), 64)
    assert bf16.route.quant == "none" and bf16.name == "lean-bfloat16" and "bfloat16" in bf16.route.why
    hf = make_runner(tiny_engine.source, EngineConfig(impl="transformers"), 64)
    assert hf.route.quant == "none" and "transformers" in hf.route.why


@pytest.mark.model
def test_the_default_model_gets_an_exact_measured_route(default_engine, exact_engine):
    route = default_engine.route
    assert route["quant"] in AUTO and route["quant"] not in route["excluded"]
    exact = {n: ms for n, ms in route["measured_ms"].items() if n not in route["excluded"]}
    assert route["measured_ms"][route["quant"]] == min(exact.values())
    assert "none" in route["measured_ms"]  # float32, the reference, always runs
    params = SamplingParams(max_tokens=24, temperature=0)
    prompt = "Explain why the sea is salty."
    assert default_engine.generate(prompt, params).token_ids == exact_engine.generate(prompt, params).token_ids
