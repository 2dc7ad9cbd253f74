"""The engine against transformers itself (oracle), and its sampling, limits, counters and cancellation."""

import threading

import pytest
import torch

from labserver import Engine, EngineConfig, Finish, PromptTooLong, SamplingParams, TokenEvent
from labserver.engine.runners import decode_one_token, prefill

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]


@pytest.mark.model
@pytest.mark.parametrize("runner", ["lean", "transformers"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_equals_hf_generate(exact_engine, hf_engine, prompt, runner):
    engine = exact_engine if runner == "lean" else hf_engine
    assert engine.runner.name == {"lean": "lean-float32", "transformers": "transformers"}[runner]
    ids = engine.encode(prompt)
    out = engine.generate(prompt, SamplingParams(max_tokens=24, temperature=0))
    with torch.inference_mode():
        ref = engine.model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    n = len(out.token_ids)
    assert out.token_ids == ref[:n]
    # HF keeps the EOS token in its output; the engine stops before emitting it.
    assert ref[n:] in ([], [engine.tokenizer.eos_token_id]) or n == 24
    assert out.finish.finish_reason == ("stop" if n < 24 else "length")
    assert out.text == engine.tokenizer.decode(out.token_ids, skip_special_tokens=True)


@pytest.mark.model
@pytest.mark.parametrize("prompt", PROMPTS)
def test_default_block_weights_give_the_float32_tokens(default_engine, exact_engine, prompt):
    """The served default keeps the GGUF's 4-bit blocks and runs them in C; greedy decoding must not notice."""
    assert default_engine.runner.name == "lean-q4_1+q8_0"
    params = SamplingParams(max_tokens=32, temperature=0)
    assert default_engine.generate(prompt, params).token_ids == exact_engine.generate(prompt, params).token_ids


@pytest.mark.model
def test_stream_events_in_order_with_timings(default_engine):
    items = list(default_engine.generate_stream("Count from one to twenty.", SamplingParams(max_tokens=12, temperature=0)))
    events, finish = items[:-1], items[-1]
    assert all(isinstance(e, TokenEvent) for e in events) and isinstance(finish, Finish)
    assert [e.index for e in events] == list(range(len(events)))
    assert events[0].prefill_time_ms is not None and all(e.prefill_time_ms is None for e in events[1:])
    assert all(e.step_ms > 0 for e in events)
    assert finish.usage["completion_tokens"] == len(events)
    assert finish.usage["prompt_tokens"] == len(default_engine.encode("Count from one to twenty."))
    assert "prefill_time_ms" in events[0].to_dict() and "prefill_time_ms" not in events[1].to_dict()


def test_kv_cache_decode_matches_full_forward(tiny_engine):
    """Reusing the cache must give the logits a full forward over the whole sequence gives."""
    from transformers import DynamicCache

    model, ids = tiny_engine.model, [1, 17, 300, 4000, 42]
    cache = DynamicCache(config=model.config)
    prefill(model, torch.tensor([ids[:-1]]), cache)
    step = decode_one_token(model, ids[-1], cache)
    with torch.inference_mode():
        full = model(input_ids=torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


def test_sampling_is_reproducible_with_a_seed(tiny_engine):
    p = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    a, b = tiny_engine.generate("hello", p), tiny_engine.generate("hello", p)
    c = tiny_engine.generate("hello", SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=8))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_top_p_tiny_keeps_only_the_argmax(tiny_engine):
    greedy = tiny_engine.generate("hello", SamplingParams(max_tokens=8, temperature=0))
    nucleus = tiny_engine.generate("hello", SamplingParams(max_tokens=8, temperature=1.5, top_p=1e-6, seed=3))
    assert nucleus.token_ids[: len(greedy.token_ids)] == greedy.token_ids


def test_length_limit_and_counters(tiny_engine):
    before = tiny_engine.tokens_generated
    out = tiny_engine.generate("hello", SamplingParams(max_tokens=5, temperature=0))
    assert len(out.events) <= 5 and tiny_engine.running == 0
    assert tiny_engine.tokens_generated - before == len(out.events) + (out.finish.finish_reason == "stop")


def test_prompt_too_long_is_raised_before_generating(tiny_engine):
    with pytest.raises(PromptTooLong, match="limit"):
        tiny_engine.generate_stream("word " * 1000, SamplingParams())
    assert tiny_engine.running == 0


def test_cancel_stops_between_steps(tiny_engine):
    cancel = threading.Event()
    gen = tiny_engine.generate_stream("hello", SamplingParams(max_tokens=50, temperature=1.0, seed=1), cancel)
    first = next(gen)
    assert tiny_engine.running == 1 and first.index == 0
    cancel.set()
    rest = list(gen)
    assert [type(x) for x in rest] == [Finish] and rest[0].finish_reason == "cancelled"
    assert tiny_engine.running == 0


def test_closing_the_generator_releases_it(tiny_engine):
    gen = tiny_engine.generate_stream("hello", SamplingParams(max_tokens=50, temperature=1.0, seed=1))
    next(gen)
    gen.close()
    assert tiny_engine.running == 0


def test_steps_keep_inference_mode_on_another_thread(tiny_engine):
    """Resuming the generator on a new thread (as run_in_executor does) must not switch autograd on."""
    gen = tiny_engine.generate_stream("hello", SamplingParams(max_tokens=6, temperature=1.0, seed=1))
    with torch.inference_mode():
        next(gen)
    errors = []
    t = threading.Thread(target=lambda: errors.extend(x for x in gen if isinstance(x, Exception)))
    t.start(), t.join(30)
    assert not errors and tiny_engine.running == 0


def test_the_engine_hands_out_blocks_as_sequences_grow_and_takes_them_back(tiny_engine):
    """A sequence holds ceil(tokens / 16) blocks, never another's unless a full block of the same prefix;
    ``end`` gives every block back (named full blocks stay findable until someone needs them)."""
    kv, params = tiny_engine.kv, SamplingParams(max_tokens=8, temperature=0)
    free = kv.num_free_blocks
    seqs = [tiny_engine.begin(list(range(1000 + 100 * i, 1000 + 100 * i + n)), params)
            for i, n in enumerate((15, 16, 17))]
    logits = tiny_engine.forward([(s, s.remaining) for s in seqs])
    assert [len(kv.table(s)) for s in seqs] == [1, 1, 2] and kv.num_free_blocks == free - 4
    for s, row in zip(seqs, logits):
        s.tokens.append(int(row.argmax()))
    tiny_engine.forward([(s, 1) for s in seqs])  # 16, 17 and 18 positions
    assert [len(kv.table(s)) for s in seqs] == [1, 2, 2] and [s.computed for s in seqs] == [16, 17, 18]
    assert len({b for s in seqs for b in kv.table(s)}) == 5
    alone = tiny_engine.begin(seqs[2].ids, params)  # its first 16 tokens are a named block now
    first = tiny_engine.forward([(alone, alone.remaining)])[0]
    assert alone.cached == 16 and kv.table(alone)[0] == kv.table(seqs[2])[0]
    torch.testing.assert_close(first, logits[2], rtol=0, atol=1e-5)  # the prefix read, not computed again
    for s in [*seqs, alone]:
        tiny_engine.end(s)
    assert kv.num_free_blocks == free and tiny_engine.running == 0


def test_other_architectures_run_on_transformers(tiny_engine):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_engine.tokenizer), n_embd=32, n_layer=1, n_head=2,
                                       n_positions=256)).eval()
    engine = Engine(model, tiny_engine.tokenizer, EngineConfig(model="tiny-gpt2", max_prompt_tokens=100))
    assert engine.runner.name == "transformers"
    out = engine.generate("hello", SamplingParams(max_tokens=5, temperature=0))
    assert len(out.events) == 5 or out.finish.finish_reason == "stop"
    assert Engine(model, tiny_engine.tokenizer, EngineConfig(model="tiny-gpt2", quant="auto")).runner.name == "transformers"
    for bad in (dict(impl="lean"), dict(quant="w4a8"), dict(quant="fp16")):
        with pytest.raises(ValueError, match="llama"):
            Engine(model, tiny_engine.tokenizer, EngineConfig(model="tiny-gpt2", **bad))


def test_config_rejects_quant_without_the_lean_runner():
    with pytest.raises(ValueError, match="lean"):
        EngineConfig(impl="transformers", quant="q4_1")
    with pytest.raises(ValueError, match="quant"):
        EngineConfig(quant="int2")


def test_greedy_picks_the_first_maximum_in_any_dtype():
    from labserver.engine.engine import sample_token

    greedy = SamplingParams(max_tokens=1, temperature=0)
    logits = torch.tensor([0.5, 3.0, -1.0, 3.0])
    assert sample_token(logits, greedy, None) == 1  # a tie: the first, as torch.argmax
    assert sample_token(logits.to(torch.bfloat16), greedy, None) == 1
    rows = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    assert [sample_token(r, greedy, None) for r in rows] == rows.argmax(1).tolist()


# -- the fake runner under the real engine --------------------------------------------------------------
def test_fake_runner_gives_hand_written_outputs_through_the_real_engine():
    from labserver import fake_engine

    engine = fake_engine(prefill_ms=0, step_ms=0, config=EngineConfig(model="fake", threads=1, max_prompt_tokens=3))
    out = engine.generate("two apples", SamplingParams(max_tokens=10, temperature=1.3, top_p=0.5))
    assert out.text == " one two three four five six seven eight one two"  # any sampling: one choice
    assert out.token_ids == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1] and out.finish.usage["prompt_tokens"] == 2
    with pytest.raises(PromptTooLong, match="limit is 3"):  # the engine's own limit, not the fake's
        engine.generate("a b c d", SamplingParams())
    assert engine.running == 0 and engine.runner.free_slots == engine.config.max_batch


def test_fake_runner_times_are_measured_and_faults_free_the_slot():
    from labserver import fake_engine

    engine = fake_engine(prefill_ms=20, step_ms=5, fail_at=3)
    gen = engine.generate_stream("a", SamplingParams(max_tokens=10))
    events = [next(gen) for _ in range(3)]
    assert events[0].prefill_time_ms >= 20 and all(e.step_ms >= 5 for e in events[1:])  # at least the sleeps
    with pytest.raises(RuntimeError, match="injected fault"):
        next(gen)
    assert engine.running == 0 and engine.runner.free_slots == engine.config.max_batch
    engine.runner.fail_at = 0
    with pytest.raises(RuntimeError, match="injected fault"):  # the prefill fails
        engine.generate("a", SamplingParams(max_tokens=2))
    assert engine.running == 0 and engine.runner.free_slots == engine.config.max_batch
