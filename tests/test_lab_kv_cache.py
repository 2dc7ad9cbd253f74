"""Notebook 8 (the KV cache): its checkers pass the reference solutions and FAIL the wrong answers a student
would write; its experiments, run on the fake engine (whose KV pool is bookkeeping only), return what the
notebook reads."""
import dataclasses
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from matplotlib.figure import Figure

from labserver import EngineConfig, fake_engine
from labserver.lab import checks, kv_cache as lab
from labserver.serve import background as serving
from notebook_solutions import solution as load_solution

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def solution():
    return load_solution("08_kv_cache")


@pytest.fixture(autouse=True)
def no_leftover_servers():
    yield
    serving.stop_all()


def test_the_reference_solutions_pass(solution, capsys):
    assert solution.run_checks(None)
    out = capsys.readouterr().out
    assert "FAIL" not in out and "TODO" not in out and out.count("PASS") == 22


# -- the block allocator ---------------------------------------------------------------------------------
def allocator(solution, free):
    """The reference allocator with another ``free``."""
    return type("Wrong", (solution.BlockAllocator,), {"free": free})


def test_an_allocator_that_frees_a_block_another_sequence_holds_fails(solution, capsys):
    def free_at_once(self, block_id):
        self.ref_count[block_id] = 0
        self.free_list.append(block_id)

    assert not checks.check_block_allocator(allocator(solution, free_at_once))
    out = capsys.readouterr().out
    assert "FAIL  BlockAllocator: block 0 had 2 holders and one let go; the next 3 allocations gave [2, 3, 0]" in out


def test_an_allocator_that_never_takes_a_block_back_fails(solution, capsys):
    def forget(self, block_id):
        self.ref_count[block_id] -= 1

    assert not checks.check_block_allocator(allocator(solution, forget))
    assert "FAIL  BlockAllocator: after block 0's last holder let go, allocate() gave None" in capsys.readouterr().out


def test_an_allocator_that_counts_holders_wrongly_fails_the_random_run(solution, capsys):
    class SetsTwo(solution.BlockAllocator):
        def share(self, block_id):
            self.ref_count[block_id] = 2  # right for the first sharer, wrong for the third holder

    assert not checks.check_block_allocator(SetsTwo)
    out = capsys.readouterr().out
    assert "PASS  BlockAllocator: after block 0's last holder let go" in out  # the hand-made case passes ...
    assert re.search(r"FAIL  BlockAllocator: operation \d+: .* held \d time\(s\) already", out)  # ... not this


def test_an_unwritten_allocator_is_todo(capsys):
    class Stub:
        def __init__(self, num_blocks):
            self.free_list = list(range(num_blocks))

        def allocate(self):
            raise NotImplementedError

    assert not checks.check_block_allocator(Stub)
    assert capsys.readouterr().out.startswith("TODO")


# -- the prefix lookup ------------------------------------------------------------------------------------
def test_a_commit_that_names_the_partial_last_block_fails(solution, capsys):
    def commit_partial(cached, token_ids, table, block_size):
        count = math.ceil(len(token_ids) / block_size)
        for name, block_id in zip(solution.block_names(token_ids, block_size, count), table):
            cached.setdefault(name, block_id)

    assert not checks.check_prefix_lookup(commit_partial, solution.lookup)
    assert "in blocks [0, 1, 2, 3]: named blocks [0, 1, 2, 3] (expected [0, 1, 2])" in capsys.readouterr().out


def test_a_lookup_that_leaves_nothing_to_compute_fails(solution, capsys):
    def whole_prompt(cached, token_ids, block_size):
        return solution.lookup(cached, token_ids + [0], block_size)  # as if one more token followed

    assert not checks.check_prefix_lookup(solution.commit, whole_prompt)
    out = capsys.readouterr().out
    assert "FAIL  prefix lookup: lookup [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]: blocks [0, 1, 2] (expected [0, 1])" in out


def test_names_that_do_not_chain_match_a_block_after_another_prefix(capsys):
    def name(token_ids, i, bs):
        return tuple(token_ids[i * bs:(i + 1) * bs])  # the block's own tokens only

    def commit(cached, token_ids, table, bs):
        for i in range(len(token_ids) // bs):
            cached.setdefault(name(token_ids, i, bs), table[i])

    def lookup(cached, token_ids, bs):
        hits = []
        for i in range((len(token_ids) - 1) // bs):
            if name(token_ids, i, bs) not in cached:
                break
            hits.append(cached[name(token_ids, i, bs)])
        return hits

    assert not checks.check_prefix_lookup(commit, lookup)
    out = capsys.readouterr().out
    assert "lookup [1, 2, 3, 4, 5, 6, 7, 8, 30, 31, 32, 33, 0]: blocks [0, 1, 6] (expected [0, 1])" in out
    assert "lookup [9, 10, 11, 12, 0]: blocks [2] (expected [])" in out
    assert "6 names for blocks" in out  # P2's second block took the name of P1's


# -- the chunk scheduler's choice ---------------------------------------------------------------------------
def prompt_first(decoding, prompt, budget):
    work = [(prompt[0], min(prompt[1], budget))] if prompt else []
    left = budget - sum(n for _, n in work)
    return work + [(seq, 1) for seq in decoding[:left]]


def over_budget(decoding, prompt, budget):
    return [(seq, 1) for seq in decoding] + ([(prompt[0], min(prompt[1], budget))] if prompt else [])


def chunk_listed_first(decoding, prompt, budget):
    work = load_solution("08_kv_cache").next_forward(decoding, prompt, budget)
    return work[-1:] + work[:-1] if prompt and len(work) > len(decoding) else work


@pytest.mark.parametrize("wrong, says", [(prompt_first, "the decode tokens of ['a', 'b', 'c'] are not in it"),
                                         (over_budget, "it carries 259 tokens, over the budget of 256"),
                                         (chunk_listed_first, "the prompt's chunk comes before decode tokens")])
def test_a_chunk_choice_that_puts_the_prompt_first_or_exceeds_the_budget_fails(wrong, says, capsys):
    assert not checks.check_chunk_choice(wrong)
    line = next(line for line in capsys.readouterr().out.splitlines() if says in line)
    assert line.startswith("FAIL") and "expected" not in line  # the rule it broke, not the right answer


def test_the_whole_run_fails_a_choice_that_wastes_the_budget(solution, capsys):
    assert not checks.check_chunk_choice(lambda d, p, b: solution.next_forward(d, p and (p[0], min(p[1], 32)), b))
    assert "budget 64: 32 forwards (the fewest within the budget: 17)" in capsys.readouterr().out


# -- the experiments, on the fake engine --------------------------------------------------------------------
def test_bytes_per_token_from_the_models_shape():
    smollm2 = SimpleNamespace(num_hidden_layers=30, num_key_value_heads=3, head_dim=64, hidden_size=576,
                              num_attention_heads=9)
    assert lab.bytes_per_token(smollm2) == 30 * 2 * 3 * 64 * 4 == 46_080
    assert lab.bytes_per_token(SimpleNamespace(num_hidden_layers=2, hidden_size=64, num_attention_heads=4)) == 2 * 2 * 4 * 16 * 4


def test_the_long_request_holds_its_blocks_and_the_table_compares_it_with_slots():
    engine = fake_engine(prefill_ms=1, step_ms=1)
    sizes = lab.measure_sizes(engine, 64)
    assert sizes.chunk == 64 and sizes.chunk_ms >= 1 and sizes.long_tokens >= 256
    mem = lab.memory_of_long_request(engine, 300, 64, per_token=100)
    assert mem.kv["blocks_used"] == math.ceil(300 / 16) and engine.kv.num_used_blocks == 0
    rows = list(mem.rows().values())
    assert rows[0] == 30_000 and rows[1] == 19 * 16 * 100 and rows[3] == 16 * 30_000
    assert rows[4] == 16 * (engine.config.max_prompt_tokens + engine.config.max_tokens_limit) * 100
    assert "slots for the worst case: 16 x 6144 tokens" in lab.memory_table(mem)
    assert lab.peak_rss_bytes() >= lab.rss_bytes() > 0


def test_prefix_caching_is_seen_in_the_usage_of_later_requests_and_turns():
    config = EngineConfig(model="fake", threads=1, block_size=4)
    runs = {}
    for label, caching in (("on", True), ("off", False)):
        engine = fake_engine(prefill_ms=2, step_ms=1, config=dataclasses.replace(config, prefix_caching=caching))
        server = serving.start_fastapi(engine, name="test-kv-prefix")
        runs[label] = lab.prefix_demo(server.url, lab.system_prompt(engine.tokenizer, 40), answer_tokens=6)
    on, off = runs["on"], runs["off"]
    assert [lab.cached_tokens(t) for t in off["shared"] + off["chat"]] == [0] * 9
    system = on["shared"][0].usage["prompt_tokens"] - len(lab.QUESTIONS[0].split())
    assert lab.cached_tokens(on["shared"][0]) == 0 and all(lab.cached_tokens(t) >= system - 4 for t in on["shared"][1:])
    chat = [lab.cached_tokens(t) for t in on["chat"]]
    assert chat == sorted(chat) and chat[-1] > chat[0]  # each turn finds the history before it
    assert "cached (on)" in lab.prefix_table(runs, "chat") and isinstance(lab.plot_prefix(runs), Figure)


def test_a_long_prompt_is_prefilled_between_the_streams_steps_only_when_chunked():
    arrivals = {}
    for label, budget in (("chunked", 64), ("whole", 4096)):
        engine = fake_engine(prefill_ms=30, step_ms=10,
                             config=EngineConfig(model="fake", threads=1, max_num_batched_tokens=budget))
        server = serving.start_fastapi(engine, name="test-kv-arrival")
        arrivals[label] = lab.long_prompt_arrives(server.url, engine.tokenizer, 300, 1, 24)
    chunked, whole = arrivals["chunked"], arrivals["whole"]
    assert chunked.long.usage["prompt_tokens"] == 300 and all(t.n_tokens == 24 for t in chunked.streams)
    # Both: the steps while the server read and tokenized it. Then whole: one forward; chunked: 300 / (64 - 3).
    assert min(chunked.tokens_during_prefill()) >= max(whole.tokens_during_prefill()) + 3
    for a in arrivals.values():
        assert a.long.sent_s > max(t.sent_s + t.arrival_ms[lab.AFTER - 1] / 1000 for t in a.streams)
        assert 10 <= a.quiet_gap_ms < 30 <= a.longest_gap_ms  # decode steps before it; a prompt's forward during it
    assert "tokens per stream meanwhile" in lab.arrival_table(arrivals)
    assert isinstance(lab.plot_arrivals(arrivals), Figure)


# -- the notebook itself -------------------------------------------------------------------------------------
def test_the_notebook_is_found_by_its_prefix_and_every_notebook_is_listed():
    names = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert "08_kv_cache" in names and "09_appendix_cpu" in names and len(names) == 9
    listed = (ROOT / "notebooks" / "README.md").read_text()
    lab_section = (ROOT / "README.md").read_text().split("## The lab")[1].split("\n## ")[0]
    assert all(f"`{name}`" in listed and f"`{name}`" in lab_section for name in names)
