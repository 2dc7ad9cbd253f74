"""A runner with fixed, known delays and no model, under the real ``Engine``: for hand-checkable tests and demos.

``FakeRunner`` has the interface of the runners in ``runners.py`` (``forward``, ``release``,
``free_slots``, ``kv_layout``, ``name``) but sleeps instead of computing: ``step_ms`` per decode forward
and ``prefill_ms`` per forward that carries any prompt (a whole prompt or a chunk), however many
sequences the forward carries (the ideal that batching aims at: a memory-bound step costs about the same
for one sequence or eight). Its KV pool (``kv_blocks``) is bookkeeping only, so the engine's admission,
prefix cache and preemption run on it as on the real model. Its logits
make each next token follow from the last (" one two three ... eight", then again), so the real engine's
sampling, prompt limits, stop rules, ``Finish`` timings and the serving backends all run unchanged, and a
reader can write down what a client must see: a TTFT a little over ``prefill_ms``, gaps a little over
``step_ms``, the same on every backend.

``WordTokenizer`` goes with it (one id per word), and ``fake_engine(...)`` builds the ``Engine``.
Left out: any relation between prompt and output, and EOS: a fake generation runs to ``max_tokens``
(or its cancellation, or the fault injected with ``fail_at``).
"""

from __future__ import annotations

import time

import torch

from ..config import EngineConfig
from .calibrate import Route
from .engine import Engine

WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight")
EOS, UNKNOWN = len(WORDS), len(WORDS) + 1  # the ids after the words'


class WordTokenizer:
    """One id per whitespace-separated word: ``WORDS`` are 0..7, EOS 8, any other word 9.

    Its chat template joins the messages' contents, so a chat counts its words too.

    >>> tok = WordTokenizer()
    >>> tok("two apples")["input_ids"], tok.decode([0, 1, EOS], skip_special_tokens=True)
    ([1, 9], ' one two')
    """

    eos_token_id = EOS
    chat_template = "{{ messages | map(attribute='content') | join(' ') }}"

    def __len__(self) -> int:
        return len(WORDS) + 2

    def __call__(self, text: str) -> dict:
        return {"input_ids": [WORDS.index(w) if w in WORDS else UNKNOWN for w in text.split()]}

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = True) -> list[int]:
        return self(" ".join(str(m.get("content", "")) for m in messages))["input_ids"]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        special = {EOS: "" if skip_special_tokens else "<eos>", UNKNOWN: " <unk>"}
        return "".join(special[i] if i >= len(WORDS) else " " + WORDS[i] for i in ids)


class FakeRunner:
    """Sleep ``prefill_ms`` per prefill and ``step_ms`` per decode step; raise at output index ``fail_at``.

    The first token is "one" (id 0), each next one the word after the last. ``max_batch`` slots, as the
    lean runner has; ``fail_at=0`` fails the prefill, ``fail_at=2`` the decode step that makes the third
    token (the forward still takes its time, then raises ``RuntimeError("injected fault")``).
    """

    route = Route("fake", "fixed sleeps, no weights")

    name = "fake"

    def __init__(self, prefill_ms: float = 50, step_ms: float = 20, fail_at: int | None = None,
                 max_batch: int = 16, context_len: int = 8192, kv_blocks: int | None = None, block_size: int = 16):
        self.prefill_ms, self.step_ms, self.fail_at = prefill_ms, step_ms, fail_at
        self.context_len, self.max_batch = context_len, max_batch
        # A pool of KV blocks as the lean runner's, for the engine's bookkeeping (nothing is stored).
        self.kv_layout = (kv_blocks or max_batch * -(-context_len // block_size), block_size)
        self.active = 0  # sequences holding a slot (fed at least once, not yet released)

    @property
    def free_slots(self) -> int:
        return self.max_batch - self.active

    def forward(self, entries) -> torch.Tensor:
        """Sleep ``step_ms`` when every entry feeds one token (a decode step), else ``prefill_ms``; the
        next id of a sequence fed to its end follows its last token ("one" first)."""
        decode = all(n == 1 and len(seq.tokens) > len(seq.ids) for seq, _, n, _ in entries)
        time.sleep((self.step_ms if decode else self.prefill_ms) / 1000)
        made = [len(seq.tokens) - len(seq.ids) for seq, *_ in entries]
        if self.fail_at is not None and self.fail_at in made:
            raise RuntimeError("injected fault")
        for seq, *_ in entries:
            if seq.state is None:
                seq.state, self.active = "slot", self.active + 1
        next_ids = [0 if m == 0 else (seq.tokens[-1] + 1) % len(WORDS) for (seq, *_), m in zip(entries, made)]
        # -inf everywhere but the next id: greedy and any temperature or top_p pick the same token.
        logits = torch.full((len(entries), len(WORDS) + 2), float("-inf"))
        logits[torch.arange(len(entries)), torch.tensor(next_ids)] = 0.0
        return logits

    def release(self, seq) -> None:
        if seq.state is not None:
            seq.state, self.active = None, self.active - 1

    def copy_rows(self, src: int, dst: int, rows: int) -> None:
        """Nothing is stored: the engine's bookkeeping of a prefix that ends inside a block is all there is."""


def fake_engine(prefill_ms: float = 50, step_ms: float = 20, fail_at: int | None = None,
                config: EngineConfig | None = None, kv_blocks: int | None = None) -> Engine:
    """The real ``Engine`` on a ``FakeRunner`` and a ``WordTokenizer``; ``config`` sets its limits and
    ``kv_blocks`` the size of its KV pool (default: every sequence's whole context).

    >>> from labserver import SamplingParams
    >>> fake_engine(prefill_ms=0, step_ms=0).generate("hi", SamplingParams(max_tokens=3)).text
    ' one two three'
    """
    config = config or EngineConfig(model="fake", threads=1)
    # The context holds the longest request the limits allow, as the lean runner's pool does.
    runner = FakeRunner(prefill_ms, step_ms, fail_at, config.max_batch,
                        context_len=config.max_prompt_tokens + config.max_tokens_limit, kv_blocks=kv_blocks,
                        block_size=config.block_size)
    return Engine(None, WordTokenizer(), config, runner=runner)
