"""Held-out English text available offline, which the project never trains, tunes or tests on.

The library's own held-out windows are Shakespeare's and Milton's held-out works
(:func:`tokensparse.lemo.analysis.held_out_windows`): Early Modern English verse, the domain the
project fine-tunes on. To check that a choice made on them (a LeMo selection rule, say) is not tuned
to that domain, this module gives modern English prose from a source every CPython installation
ships: the Python Language Reference topics of :mod:`pydoc_data.topics` (the text of
``help("assert")`` etc.; technical prose with code fragments, ~0.5 MB). Nothing else in the project
reads it; keep it that way, so that it stays held out.

- :func:`english_text`: the topics' texts in sorted topic order, separated by blank lines.
- :func:`english_windows`: ``count`` token windows of ``seq_len`` from it, evenly spread and not
  overlapping (deterministic for a tokenizer).
"""

from __future__ import annotations

import functools

import numpy as np

SOURCE = "pydoc_data.topics (the Python Language Reference topics shipped with CPython)"


@functools.cache
def english_text() -> str:
    """The held-out English text (see the module docstring)."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # a stripped Python without pydoc_data
        raise RuntimeError("held-out English text needs the standard library's pydoc_data "
                           "package, which this Python installation lacks.") from e
    return "\n\n".join(topics[name].strip() for name in sorted(topics))


def english_windows(tokenizer, seq_len: int, count: int) -> list[np.ndarray]:
    """``count`` windows of ``seq_len`` token ids (int32) from :func:`english_text`, encoded with
    ``tokenizer`` (anything with ``encode(text).ids``), starting at evenly spaced offsets that leave
    the windows disjoint. Raises ``ValueError`` when the text is too short for them."""
    if seq_len <= 0 or count <= 0:
        raise ValueError(f"seq_len={seq_len} and count={count} must be positive.")
    ids = np.asarray(tokenizer.encode(english_text()).ids, np.int32)
    if count * seq_len > len(ids):
        raise ValueError(f"the held-out English text has {len(ids)} tokens; {count} windows of "
                         f"{seq_len} need {count * seq_len}.")
    stride = len(ids) // count
    return [ids[i * stride:i * stride + seq_len] for i in range(count)]
