"""The one place benchmarks get matplotlib from (headless); None, with a message, without it."""

from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (and a printed note) when not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot written")
        return None
    return plt
