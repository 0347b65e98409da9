"""zipserve.router: the OpenAI-compatible HTTP front end (FastAPI), job tracking and timings.

It talks to the serving side only through the `Backend` protocol (`router/backend.py`), never to
the engine or Ray directly. `create_app(backend)` builds the app; `FakeBackend` serves tests.
"""

from zipserve.router.backend import (
    PHASES,
    Backend,
    BackendEvent,
    FinishEvent,
    Job,
    PhaseEvent,
    TokenEvent,
)
from zipserve.router.jobs import JobRecord, JobRegistry, JobState

__all__ = ["PHASES", "Backend", "BackendEvent", "FinishEvent", "Job", "JobRecord",
           "JobRegistry", "JobState", "PhaseEvent", "TokenEvent", "create_app", "FakeBackend"]


def __getattr__(name: str):
    # Lazy, so that backends can import the protocol types without pulling in FastAPI.
    if name == "create_app":
        from zipserve.router.app import create_app

        return create_app
    if name == "FakeBackend":
        from zipserve.router.fake_backend import FakeBackend

        return FakeBackend
    raise AttributeError(name)
