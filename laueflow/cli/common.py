"""What every command shares: the exit status and message of bad input, and loading a configuration.

Input problems (configuration, scan, site, results) are reported as one ``error: ...`` line on stderr
with exit status 2, before anything is written.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import click

from ..config import Config, load
from ..errors import LaueflowError

INPUT_ERROR = 2


def fail(message: str) -> NoReturn:
    """Report bad input and exit with status 2."""
    click.echo(f"error: {message}", err=True)
    sys.exit(INPUT_ERROR)


def echo_err(line: str) -> None:
    click.echo(line, err=True)


@contextmanager
def input_errors() -> Iterator[None]:
    """Turn the errors of bad input (any :class:`LaueflowError`) into one message and exit status 2."""
    try:
        yield
    except LaueflowError as exc:
        fail(str(exc))


def show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: object = None, line: str | None = None) -> None:
    """``warnings.showwarning`` of the command line: laueflow's own warnings (configuration, scan,
    resume) as one ``warning: ...`` line on stderr, others in Python's format."""
    if category.__module__.startswith("laueflow."):
        click.echo(f"warning: {message}", err=True)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def one_line_warnings() -> None:
    """Show warnings through :func:`show_warning` from now on."""
    warnings.showwarning = show_warning


def load_config(path: Path) -> Config:
    """Load a configuration, printing its warnings as ``warning: ...`` on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with input_errors():
            cfg = load(path)
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    return cfg
