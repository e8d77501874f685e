"""Regular expressions written by other people, matched with a bound on time.

Why: a rule's ``module_path`` and an adapter config's ``target_modules``, ``rank_pattern``,
``alpha_pattern``, ``exclude_modules`` and ``layers_pattern`` are regexes from whoever wrote the
rules file or trained the adapter. Python's ``re`` backtracks without limit, so one pattern such
as ``(a|aa)+`` against a long module path never returns, and the process hangs while loading a
file. Here each pattern is checked with ``re`` (so exactly the syntax PEFT and Python accept is
accepted, with ``re``'s error messages) and matched with the `regex
<https://pypi.org/project/regex/>`_ package, which takes a timeout: one match may take at most
:data:`MATCH_TIMEOUT` seconds of CPU time, and all the matches of one :class:`PatternSet` (the
patterns of one file or one rule list) at most :data:`TOTAL_BUDGET` seconds together, so a file
full of slow patterns is bounded too. Ordinary patterns match module paths in microseconds; the bounds only
ever stop hostile or broken ones, with an error naming the file, the field and the pattern.
"""

from __future__ import annotations

import re
import time

import regex

from graphlora.errors import GraphloraError, RuleError

__all__ = ["MATCH_TIMEOUT", "MAX_PATTERN_LENGTH", "TOTAL_BUDGET", "BoundedPattern", "PatternSet"]

#: Seconds one match may take (CPU seconds, as ``regex`` counts them: on a loaded machine the
#: wall-clock time is longer). An ordinary pattern matches a module path in microseconds.
MATCH_TIMEOUT = 0.25
#: Wall-clock seconds all matches of one PatternSet may take together.
TOTAL_BUDGET = 10.0
#: Longest pattern accepted (characters); graphlora's own exact-match alternations of every module
#: path of a large model stay far below it.
MAX_PATTERN_LENGTH = 1_000_000


class PatternSet:
    """The patterns of one source (a rules list, an adapter config), sharing one time budget.

    ``error`` is the exception class raised for a bad or too slow pattern (``RuleError`` for
    rules, ``FileFormatError`` for an adapter config).
    """

    def __init__(self, source: str, *, error: type[GraphloraError] = RuleError, budget: float = TOTAL_BUDGET):
        self.source = source
        self.error = error
        self.budget = budget
        self.spent = 0.0
        self._compiled: dict[tuple[str, str], BoundedPattern] = {}

    def compile(self, pattern: str, what: str, *, template: str = "{}") -> BoundedPattern:
        """Check ``pattern`` and return it ready to match. ``what`` names it in errors (``rule #0
        module_path``, ``'rank_pattern' key``); ``template`` embeds it in a larger expression
        (PEFT wraps pattern keys as ``(.*\\.)?({})$``) after the pattern itself was checked."""
        key = (pattern, template)
        found = self._compiled.get(key)
        if found is not None:
            return found
        where = f"{self.source}: {what}" if self.source else what
        if not isinstance(pattern, str):
            raise self.error(f"{where} must be a string regex, got {type(pattern).__name__} {pattern!r}")
        if len(pattern) > MAX_PATTERN_LENGTH:
            raise self.error(f"{where} is {len(pattern)} characters long; the limit is {MAX_PATTERN_LENGTH}")
        full = template.format(pattern)
        try:
            re.compile(pattern)  # the syntax Python (and so PEFT) accepts, with re's messages
            re.compile(full)
            compiled = regex.compile(full)
        except (re.error, regex.error) as exc:
            raise self.error(f"{where} is not a valid regular expression ({_show(pattern)}: {exc})") from None
        except (RecursionError, OverflowError, MemoryError):
            raise self.error(f"{where} {_show(pattern)} is nested too deeply or repeats too often to compile") from None
        found = BoundedPattern(pattern, where, compiled, self)
        self._compiled[key] = found
        return found

    def _charge(self, seconds: float, pattern: BoundedPattern, text: str) -> None:
        self.spent += seconds
        if self.spent > self.budget:
            raise self.error(
                f"{self.source or 'the rules'}: matching their patterns against module paths took more than "
                f"{self.budget:g} s in all (last: {pattern.where} {_show(pattern.pattern)} against "
                f"{_show(text)}); simplify the patterns"
            )

    def timeout(self) -> float:
        return max(0.001, min(MATCH_TIMEOUT, self.budget - self.spent))


class BoundedPattern:
    """One checked pattern; ``fullmatch``/``match``/``search`` return a bool within the bounds."""

    def __init__(self, pattern: str, where: str, compiled: regex.Pattern, owner: PatternSet):
        self.pattern = pattern
        self.where = where
        self._compiled = compiled
        self._owner = owner

    def run(self, method: str, text: str) -> regex.Match | None:
        """``regex``'s ``fullmatch``/``match``/``search`` of ``text``, within the bounds."""
        owner = self._owner
        limit = owner.timeout()
        start = time.perf_counter()
        try:
            found = getattr(self._compiled, method)(text, timeout=limit)
        except TimeoutError:
            owner.spent += time.perf_counter() - start
            raise owner.error(
                f"{self.where} {_show(self.pattern)}: matching it against {_show(text)} took more "
                f"than {limit:g} s; the pattern backtracks catastrophically (nested or overlapping "
                "repetition such as (a|aa)+ or (x+)+y): rewrite it, e.g. as an alternation of exact "
                "names"
            ) from None
        owner._charge(time.perf_counter() - start, self, text)
        return found

    def fullmatch(self, text: str) -> bool:
        return self.run("fullmatch", text) is not None

    def match(self, text: str) -> bool:
        return self.run("match", text) is not None

    def search(self, text: str) -> bool:
        return self.run("search", text) is not None


def _show(text: str, limit: int = 80) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"
