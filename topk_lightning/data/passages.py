"""Inputs made of several passages: position ids that restart at every passage.

A question asked over many passages joined into one long second text (long-input BoolQ, retrieved documents) can
number each passage's tokens from the end of the question, as if it were the only passage: a model trained on
single passages then sees every passage where it saw its own, and the position table needs only question + longest
passage rows. Attention still spans the whole input. Measured on long-input BoolQ in the README ("Long-input BoolQ").

Only the standard library: the GPU benchmark imports it.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

__all__ = ["PASSAGE_SEPARATOR", "passage_position_ids"]

PASSAGE_SEPARATOR = "\n\n"


def passage_position_ids(passage: str, token_type_ids: Sequence[int], offsets: Sequence[tuple[int, int]], *,
                         separator: str = PASSAGE_SEPARATOR) -> list[int]:
    """Position ids that restart at every passage of a long input, as if each were the question's only passage.

    The first text (``[CLS] question [SEP]``, ``token_type_ids == 0``) keeps positions ``0 .. q-1``; the tokens of
    each passage in ``passage`` (passages joined by ``separator``) count from ``q`` again, so every passage sits
    where a model trained on single passages saw its own, no position past the longest passage is used, and the
    order of the passages no longer reaches the model. Tokens of the second text with an empty offset (the final
    ``[SEP]``) continue the passage before them.

    Args:
        passage: the second text of the pair (the joined passages).
        token_type_ids, offsets: the pair's encoding (a fast tokenizer's ``return_offsets_mapping=True``; offsets
            of second-text tokens are character spans in ``passage``).
    """
    if len(token_type_ids) != len(offsets):
        raise ValueError(f"token_type_ids ({len(token_type_ids)}) and offsets ({len(offsets)}) differ in length")
    starts, start = [], 0
    for text in passage.split(separator):
        starts.append(start)
        start += len(text) + len(separator)
    first = sum(1 for t in token_type_ids if t == 0)  # the first text's length: where every passage starts
    positions, current, next_position = [], -1, first
    for index, (segment, (begin, end)) in enumerate(zip(token_type_ids, offsets)):
        if segment == 0:
            positions.append(index)
            continue
        if end > begin:  # a word-piece of the passage text; special tokens have empty spans
            which = bisect.bisect_right(starts, begin) - 1
            if which != current:
                current, next_position = which, first
        positions.append(next_position)
        next_position += 1
    return positions
