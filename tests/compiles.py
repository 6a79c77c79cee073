"""Counting XLA compilations, shared by the tests that check a step compiles once."""

import contextlib
from collections.abc import Iterator

import jax


@contextlib.contextmanager
def counting_compiles() -> Iterator[list[float]]:
    """The XLA compilations that happen inside the block, as a list that grows."""
    seen: list[float] = []

    def listener(name: str, secs: float, **kwargs: object) -> None:
        if name == "/jax/core/compile/backend_compile_duration":
            seen.append(secs)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
