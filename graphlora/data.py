"""Real English text that ships with Python: sentences from ``pydoc_data.topics``.

The demo, the benchmarks and the tests need text that is not random tokens and that needs no
download. The Python documentation topics (~465k characters) are in every CPython install.
Sentences come out in a fixed order, so splits are reproducible across machines.
"""

from __future__ import annotations

import random
import re


def pydoc_sentences(min_chars: int = 40, max_chars: int = 400) -> list[str]:
    """Prose sentences from the stdlib documentation topics, deduplicated, in a fixed order."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    out: list[str] = []
    for key in sorted(topics):
        text = topics[key]
        for paragraph in re.split(r"\n\s*\n", text):
            lines = [ln.strip() for ln in paragraph.splitlines()]
            if not lines or any(ln.startswith((">>>", "...", "|", "+", "=")) or "::=" in ln for ln in lines):
                continue  # code samples, tables and grammar rules are not prose
            flat = " ".join(ln for ln in lines if ln)
            for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat):
                sentence = sentence.strip()
                if not (min_chars <= len(sentence) <= max_chars):
                    continue
                if sum(c.isalpha() for c in sentence) < 0.6 * len(sentence):
                    continue
                if sentence not in seen:
                    seen.add(sentence)
                    out.append(sentence)
    return out


def split(items: list, heldout: float = 0.2, seed: int = 0) -> tuple[list, list]:
    """A reproducible (train, held-out) split after a seeded shuffle."""
    rng = random.Random(seed)
    shuffled = list(items)
    rng.shuffle(shuffled)
    n_held = max(1, int(round(len(shuffled) * heldout)))
    return shuffled[n_held:], shuffled[:n_held]
