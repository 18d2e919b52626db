"""Flower's object pull with a short retry backoff: the constants and the labelled patch
shared by the SuperNode launcher (backends/fl/supernode.py), the site runner and the
deployment engine's ServerApp (backends/fl/app.py), in a module of its own so that none of
them imports another for it.

Why (see backends/fl/supernode.py for the whole story): a message is announced before its
objects are uploaded, so the first pull of an object often finds it missing, and Flower's
`pull_objects` then retries after 1 s, doubling up to 10 s (module constants, no setting).
"""

from __future__ import annotations

PULL_BACKOFF_S = 0.02   # instead of 1 s: first retry of an object not uploaded yet
PULL_BACKOFF_CAP_S = 0.25   # instead of 10 s: the longest wait between two tries


class FlowerChanged(RuntimeError):
    """The installed Flower's code is not the one a patch was written for."""


def patch_object_pull(module, initial_s: float = PULL_BACKOFF_S, cap_s: float = PULL_BACKOFF_CAP_S) -> None:
    """Give `module`'s `pull_objects` (Flower's, imported by name) a shorter retry backoff."""
    import functools

    from flwr.supercore.inflatable import inflatable_utils

    current = getattr(module, "pull_objects", None)
    original = getattr(current, "func", current)
    if original is not inflatable_utils.pull_objects or "initial_backoff" not in \
            inflatable_utils.pull_objects.__code__.co_varnames:
        raise FlowerChanged(f"{module.__name__}.pull_objects is not Flower's pull_objects with an "
                            "initial_backoff; re-check the object pull before patching it")
    module.pull_objects = functools.partial(original, initial_backoff=initial_s, backoff_cap=cap_s)
