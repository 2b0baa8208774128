"""Hypothesis settings of the property tests: derandomized (the same examples on every run, so CI is
stable), no example database in the work tree, no deadline (the machines are shared). Raise the
number of examples for a longer local run with GAIKAN_FUZZ_EXAMPLES=2000 (0 keeps the defaults)."""

import os

from hypothesis import HealthCheck, settings

_SCALE = int(os.environ.get("GAIKAN_FUZZ_EXAMPLES", "0") or 0)


def fuzz(max_examples: int):
    """@fuzz(n): hypothesis settings for a property test with n examples (or GAIKAN_FUZZ_EXAMPLES)."""
    return settings(max_examples=_SCALE or max_examples, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])
