"""The reconstruction workflow: per scan point, one task per detector tile, then one stitching task.

``dag.run`` builds the task graph and its :class:`~laueflow.workflow.dag.Driver` runs it on a Parsl
configuration (see ``laueflow.sites``); ``apps`` holds the Parsl apps, ``tasks`` the plain functions
they run and ``outcomes`` what they return; ``hooks`` is how front ends follow and extend a run.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Driver", "PointResult", "RunError", "RunHooks", "RunOptions", "RunResult", "run"]


def __getattr__(name: str) -> Any:
    """The names of ``dag``, imported on first use: ``dag`` loads Parsl and JAX (seconds), which the
    light modules of this package (``hooks``, ``status``) and the command line's start must not wait for."""
    if name in __all__:
        from . import dag

        return getattr(dag, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
