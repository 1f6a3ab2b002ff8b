"""The reconstruction workflow: per scan point, one task per detector tile, then one stitching task.

``dag.run`` builds and drives the task graph on a Parsl configuration (see ``laueflow.sites``);
``apps`` holds the Parsl apps and ``tasks`` the plain functions they run.
"""

from .dag import PointResult, RunError, RunResult, run

__all__ = ["PointResult", "RunError", "RunResult", "run"]
