"""Calibrating the mask pose from thin-film scans (issue 13): the fit (:mod:`.fit`, science on arrays)
and the reading of film scans (:mod:`.films`)."""

from .fit import DEFAULT_FIT, PARAMETERS, Calibration, Film, SpotDepths, fit_pose, nominal_pose

__all__ = ["DEFAULT_FIT", "PARAMETERS", "Calibration", "Film", "SpotDepths", "fit_pose", "nominal_pose"]
