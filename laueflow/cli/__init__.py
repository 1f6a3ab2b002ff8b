"""The ``laueflow`` command: run a reconstruction, simulate a scan, check a configuration, list sites.

One module per group of commands (``run``: run and watch; ``results``: score and export; ``show``: figures;
``simulate``; ``config``; ``sites``; ``transfer``); each only parses its arguments, calls the library
and maps errors to exit statuses (``common``).  Input problems (configuration, scan, site) are reported
as one ``error: ...`` line on stderr with exit status 2, before anything is written.  A run in which
some point failed exits with status 1.
"""

from __future__ import annotations

import click

from .. import __version__
from .calibrate import calibrate
from .common import INPUT_ERROR, one_line_warnings
from .config import config_group
from .results import export_command, score_command
from .run import run, watch
from .show import show
from .simulate import simulate
from .sites import sites_command
from .transfer import transfer_command

__all__ = ["INPUT_ERROR", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="laueflow")
def main() -> None:
    """Depth-resolved reconstruction of coded-aperture Laue micro-diffraction scans."""
    one_line_warnings()


for _command in (run, watch, simulate, config_group, sites_command, score_command, transfer_command, show,
                 export_command):
    main.add_command(_command)
main.add_command(calibrate)
