"""`laueflow transfer`: send a run's result files with Globus Transfer."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ..config import transfer_settings
from ..io.layout import RunFolder
from ..progress import plural
from ..transfer import Transfers, record_status, recorded_settings, run_files, settings_dict, transfer_client
from .common import fail, input_errors, load_config


@click.command("transfer")
@click.argument("out_dir", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="Configuration whose transfer section to use (default: the one the run used).")
@click.option("--source", help="Source collection UUID (where OUT_DIR lies).")
@click.option("--destination", help="Destination collection UUID.")
@click.option("--destination-path", help="Destination folder; OUT_DIR arrives as <path>/<OUT_DIR name>.")
@click.option("--source-root", help="Local folder that the source collection's / corresponds to.")
@click.option("--sync-level", type=click.Choice(["exists", "size", "mtime", "checksum"]),
              help="When a file already at the destination is sent again.")
@click.option("--verify/--no-verify", "verify_checksum", default=None,
              help="Compare checksums after copying.")
@click.option("--retries", type=click.IntRange(min=0), help="Resubmissions of a failed or timed-out task.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
              help="Seconds a task may take before it is cancelled and resent.")
@click.option("--client-id", help="Globus native-app client ID for logging in.")
@click.option("--wait", type=click.FloatRange(min=0),
              help="Seconds to wait for all transfers (default: long enough for every retry).")
@click.option("--interval", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Seconds between checks of the tasks.")
@click.option("--login", is_flag=True, help="Log in to Globus first (interactive); OUT_DIR is then optional.")
def transfer_command(out_dir: Path | None, config_file: Path | None, wait: float | None, interval: float,
                     login: bool, **options: Any) -> None:
    """Send (or send again) the finished result files of OUT_DIR with Globus Transfer.

    Point files and per-depth files go to <destination-path>/<OUT_DIR name>/ on the destination
    collection; settings come from the transfer section of the configuration, options override them.
    Exit status 0 when every file arrived, 1 when some did not, 2 on bad settings or a missing login."""
    if out_dir is None and not login:
        fail("give OUT_DIR (a run's output folder), or --login to log in only")
    base = load_config(config_file).transfer if config_file is not None else (
        recorded_settings(out_dir) if out_dir is not None else None)
    section = settings_dict(base) if base is not None else {}
    section.update({k: v for k, v in options.items() if v is not None})
    if not {"source", "destination", "destination_path"} <= set(section):
        fail("no transfer settings: give --config FILE with a transfer section, or --source, --destination "
             "and --destination-path")
    files = run_files(out_dir) if out_dir is not None else []
    if out_dir is not None and not files:
        fail(f"{out_dir}: no finished result files (point_<k>.h5) to transfer")
    with input_errors():
        settings = transfer_settings(section, "transfer settings")
        client = transfer_client(settings, login=login)
        if login:
            click.echo("logged in to Globus")
        if out_dir is None:
            return
        transfers = Transfers(settings, out_dir, client, report=click.echo, poll_interval=interval)
    click.echo(f"sending {plural(len(files), 'file')} from {settings.source}:{transfers.source_dir} to "
               f"{settings.destination}:{transfers.destination_dir}")
    transfers.add(files)
    ok = transfers.finish(transfers.patience() if wait is None else wait)
    if not record_status(out_dir, transfers.snapshot()):
        click.echo(f"(transfer states not recorded: {RunFolder(out_dir).status} is missing or its run is "
                   "still going)", err=True)
    click.echo(transfers.summary())
    sys.exit(0 if ok else 1)
