"""`laueflow sites [show NAME]`: the named sites and their options."""

from __future__ import annotations

import os

import click

from .. import sites
from .common import input_errors


@click.group("sites", invoke_without_command=True)
@click.pass_context
def sites_command(ctx: click.Context) -> None:
    """List the named sites (use one with `laueflow run --site NAME`)."""
    if ctx.invoked_subcommand is not None:
        return
    found = sites.list_sites()
    if not found:
        click.echo(f"no sites in {sites.sites_dir()}")
        return
    width = max(len(name) for name, _ in found)
    for name, doc in found:
        click.echo(f"{name:<{width}}  {doc}")
    click.echo(f"(in {sites.sites_dir()}; any file defining config(workers, run_dir, **options) works with "
               f"--site path/to/site.py)")


@sites_command.command("show")
@click.argument("name")
def sites_show(name: str) -> None:
    """Print the options of site NAME, their defaults and the environment variables that set them."""

    with input_errors():
        module = sites.load_site(name)
    click.echo(f"{name}: {(module.__doc__ or '').strip().splitlines()[0] if module.__doc__ else ''}")
    options = getattr(module, "OPTIONS", None)
    if not options:
        click.echo("(no documented options)")
        return
    env_var = getattr(module, "env_var", None)
    for option, (default, _kind, help_text) in options.items():
        default_text = "(required)" if default is None else repr(default)
        line = f"  {option} = {default_text}"
        if env_var is not None:
            var = env_var(option)
            line += f"  [{var}" + (f"={os.environ[var]!r}" if var in os.environ else "") + "]"
        click.echo(line)
        click.echo(f"      {help_text}")
