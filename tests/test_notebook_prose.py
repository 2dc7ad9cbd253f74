"""The notebooks' prose after an experiment: a sentence that reports how a run came out must be printed by
that run, as a claim. This test lists every markdown sentence, after the first experiment, with a number
and a unit or a comparison word ("faster", "more", "grows", "about the same", "3x", ...) and fails unless
the sentence is

- a question or a prediction (it ends in "?", or it asks to predict);
- a conditional explanation (if, would, could, can, may, might, depends, unless, whether): it says what
  happens under a condition, not what this run measured;
- mechanism: its paragraph opens with the line `<!-- mechanism -->` (invisible in the rendered notebook),
  which says that the paragraph explains why, or defines, by the design and its arithmetic, and reports
  nothing this run measured;
- the lead-in of a claim: its cell is directly followed by a code cell that calls `claim(...)`, which
  prints the sentence's relation with this run's numbers.

The rules (and the marker) are described in notebooks/README.md. Exercises are instructions graded by
their checkers, so the prose is read up to `## Exercises` (an appendix's `## Questions`); fenced code
blocks are not prose.
"""
import re
import sys
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
sys.path.insert(0, str(NOTEBOOKS))
from build import parse, sources  # noqa: E402

MECHANISM = "<!-- mechanism -->"
COMPARISON = re.compile(
    r"\b(than|more|less|fewer|faster|slower|longer|shorter|higher|lower|larger|smaller|bigger|cheaper|costlier"
    r"|sooner|grows?|grew|growing|flat|twice|half as|(?:several|many|a few|two|three|four|ten|\d+) times"
    r"|(?:about|roughly|nearly|almost|much) the same|the same as|\d+(?:\.\d+)?x)\b", re.I)
NUMBER_WITH_UNIT = re.compile(r"\d[\d,.]*\s?(?:ms|s|x|×|%|MB|MiB|GB|GiB|KB|kB|tokens?/s|requests?/s)(?![\w-])")
CONDITIONAL = re.compile(r"\b(if|would|could|can|cannot|may|might|depends?|unless|whether)\b", re.I)
SENTENCE_END = re.compile(r"(?<=[.?!])\s+(?=[A-Z*(`\"])")


def sentences(markdown: str) -> list[str]:
    """The prose sentences of a markdown cell: code fences dropped, headings and list items kept apart."""
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    out = []
    for block in re.split(r"\n\s*\n|\n(?=\s*(?:[-*] |\d+\. |#))", text):
        block = " ".join(re.sub(r"^\s*(?:[-*] |\d+\. |#+ )", "", block).split())
        out += [s for s in SENTENCE_END.split(block) if s]
    return out


def needs_binding(sentence: str) -> bool:
    return bool(COMPARISON.search(sentence) or NUMBER_WITH_UNIT.search(sentence))


def exempt(sentence: str) -> bool:
    """A question, a prediction, or a conditional explanation."""
    return sentence.rstrip(")").endswith("?") or "predict" in sentence.lower() or bool(CONDITIONAL.search(sentence))


def unbound(cells: list[tuple[str, str, list[str]]]) -> list[tuple[int, str]]:
    """(cell index, sentence) of every outcome sentence after the first experiment that nothing binds."""
    found, setup_done, started = [], False, False
    for i, (kind, text, _) in enumerate(cells):
        if kind == "code":
            started = started or setup_done
            continue
        setup_done = setup_done or "**Setup ends here.**" in text
        if not started:
            continue
        text = re.split(r"## (?:Exercises|Questions)", text)[0]
        lead_in = i + 1 < len(cells) and cells[i + 1][0] == "code" and "claim(" in cells[i + 1][1]
        prose = "\n\n".join(p for p in re.split(r"\n\s*\n", text) if not p.lstrip().startswith(MECHANISM))
        if not lead_in:
            found += [(i, s) for s in sentences(prose) if needs_binding(s) and not exempt(s)]
        if re.search(r"## (?:Exercises|Questions)", cells[i][1]):
            break
    return found


def test_the_rule_on_cells_written_by_hand():
    cells = [("markdown", "**Setup ends here.**", []), ("code", "run()", []),
             ("markdown", "The stream was 3.1x faster here. Did it grow?", []),   # an outcome, a question
             ("markdown", "If the step were longer, TTFT would grow.\n\n" + MECHANISM + "\nA batch reads the "
              "weights once, so a step of 8 costs less than 8 steps.\n\nIt ran 2 ms slower.", []),  # mechanism
             ("markdown", "Streaming shows the first token sooner:", []), ("code", "claim('...', ok)", []),
             ("markdown", "## Exercises\n\nMake it faster.", [])]
    assert unbound(cells) == [(2, "The stream was 3.1x faster here."), (3, "It ran 2 ms slower.")]
    assert sentences("# Title\n\n- one item. Two.\n- three") == ["Title", "one item.", "Two.", "three"]


@pytest.mark.parametrize("source", sources(), ids=lambda p: p.stem)
def test_outcome_sentences_are_printed_claims_or_marked_mechanism(source):
    found = unbound(parse(source.read_text()))
    assert not found, "sentences that report an outcome with no claim printed for them (rewrite as a claim, " \
        f"or mark the explanation `{MECHANISM}`):\n" + "\n".join(f"  cell {i}: {s}" for i, s in found)
