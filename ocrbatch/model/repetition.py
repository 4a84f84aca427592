"""A guard against decoding loops: output that repeats the same token cycle over and over.

Small vision-language models sometimes fall into a loop on a hard crop (a
line, a table row or a single token generated again and again) and would run
on until ``max_tokens``, which on a CPU costs minutes per block. The guard
watches the tokens as they are generated and says where to cut as soon as
the tail of the output is one cycle of 1 to ``max_period`` tokens repeated
at least ``min_repeats`` times over at least ``min_tokens`` tokens. The cut
keeps everything before the loop and one copy of the cycle, and the
sequence should finish with reason ``repetition``.

Both thresholds must hold, so short legitimate runs (a row of empty table
cells, a dotted leader in a table of contents, a few identical table rows)
pass, while a real loop is stopped after a few hundred tokens instead of
thousands. :func:`guard_for` picks looser settings for table prompts, whose
outputs (OTSL grids) are far more regular than prose.

Cost: :meth:`RepetitionGuard.push` does O(``max_period``) work per token as a
few NumPy vector operations on arrays of ``max_period`` elements (a few
microseconds at the default 128), independent of how long the output
already is: cheap next to a decode step, which takes milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

TABLE_PROMPT = "Table Recognition:"


@dataclass(frozen=True)
class LoopSettings:
    """When a repeated tail counts as a loop."""

    max_period: int = 128  # longest cycle looked for, in tokens
    min_repeats: int = 5  # the cycle must occur at least this many times in a row
    min_tokens: int = 200  # ... and the repeats must cover at least this many tokens

    def __post_init__(self):
        if self.max_period < 1 or self.min_repeats < 2 or self.min_tokens < 1:
            raise ValueError("max_period >= 1, min_repeats >= 2 and min_tokens >= 1 are required")


PROSE = LoopSettings()
# Table output is a grid of tags: an empty 20 x 10 form is already a
# 11-token cycle repeated 20 times, so only much longer runs count.
TABLE = LoopSettings(max_period=256, min_repeats=8, min_tokens=1500)


class RepetitionGuard:
    """Follows one generated sequence token by token and reports a loop at its end.

    >>> guard = RepetitionGuard(LoopSettings(max_period=4, min_repeats=3, min_tokens=6))
    >>> [guard.push(t) for t in [7, 1, 2, 1, 2, 1, 2, 1]]
    [None, None, None, None, None, None, 3, 3]

    ``push`` returns ``None`` while there is no loop, else how many of the
    tokens pushed so far to keep (the text before the loop plus one cycle).
    """

    def __init__(self, settings: LoopSettings = PROSE):
        self.settings = settings
        period = settings.max_period
        self._periods = np.arange(1, period + 1)
        # The last max_period tokens, newest first: _recent[k] is the token
        # k + 1 positions before the one being pushed.
        self._recent = np.full(period, -1, dtype=np.int64)
        # _runs[p - 1]: how many of the latest tokens each equal the token p
        # positions before them, i.e. how far a period-p cycle reaches back.
        self._runs = np.zeros(period, dtype=np.int64)
        # Smallest span a loop of each period must cover.
        self._needed = np.maximum(settings.min_tokens, settings.min_repeats * self._periods)
        self.n_tokens = 0

    def push(self, token: int) -> int | None:
        """Add the next generated token; return the number of tokens to keep if a loop ends here."""
        # Positions before the start of the output hold -1 and never match a real token.
        matches = self._recent == token
        self._runs = np.where(matches, self._runs + 1, 0)
        self._recent[1:] = self._recent[:-1]
        self._recent[0] = token
        self.n_tokens += 1
        # A run of r matches at period p means the last r + p tokens are that cycle repeated.
        covered = self._runs + self._periods
        looping = covered >= self._needed
        if not looping.any():
            return None
        longest = int(np.max(np.where(looping, self._runs, -1)))
        return self.n_tokens - longest


def guard_for(prompt: str) -> RepetitionGuard:
    """A fresh guard with the settings that suit this task prompt."""
    return RepetitionGuard(TABLE if prompt.strip() == TABLE_PROMPT else PROSE)


def cut_repetition(tokens: Iterable[int], settings: LoopSettings = PROSE) -> tuple[list[int], bool]:
    """Run a guard over finished output: ``(tokens kept, whether a loop was cut)``.

    Stops at the first point where a loop is detected, exactly as the guard
    would have stopped the decoding there.
    """
    guard = RepetitionGuard(settings)
    kept = []
    for token in tokens:
        kept.append(token)
        keep = guard.push(token)
        if keep is not None:
            return kept[:keep], True
    return kept, False
