"""`laueflow config check|show`: validate or print a beamline configuration."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import click
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from ..config import Config
from .common import load_config

_COMMENT_COLUMN = 36  # where `# default` marks start in `config show`


@click.group("config")
def config_group() -> None:
    """Check or show a beamline configuration file."""


@config_group.command("check")
@click.argument("file", type=click.Path(path_type=Path))
def config_check(file: Path) -> None:
    """Validate FILE and the mask code it names; list unknown or unused keys as warnings."""
    cfg = load_config(file)
    r0, r1, c0, c1 = cfg.file.frame
    mask = cfg.geo.mask
    code = (f"mask code {cfg.resolve(mask.path)} (sha256 {mask.sha256[:16]})" if mask.sha256
            else "generated de Bruijn B(2, 8) mask code")
    click.echo(f"OK: {file}: {cfg.file.n_frames} frames per point, region {r1 - r0} x {c1 - c0} pixels, "
               f"{len(cfg.geo.source.depths)} depth bins, {code}")


@config_group.command("show")
@click.argument("file", type=click.Path(path_type=Path))
def config_show(file: Path) -> None:
    """Print FILE as laueflow resolves it, every default filled in and marked `# default`."""
    cfg = load_config(file)
    click.echo(annotated_yaml(cfg), nl=False)


def annotated_yaml(cfg: Config) -> str:
    """The configuration as YAML (the beamline schema of :meth:`Config.to_dict`), each value that came
    from laueflow's defaults rather than the file marked with a ``# default`` comment."""
    data = _commented(cfg.to_dict())
    for key in cfg.defaults:
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, CommentedMap) else None
        if isinstance(node, CommentedMap) and leaf in node:
            node.yaml_add_eol_comment("default", leaf, column=_COMMENT_COLUMN)
    mask = data["geo"]["mask"]
    if "sha256" in mask:
        mask.yaml_add_eol_comment("of the code in geo.mask.path", "sha256", column=_COMMENT_COLUMN)
    yaml = YAML()
    yaml.width = 120
    buf = io.StringIO()
    yaml.dump(data, buf)
    return buf.getvalue()


def _commented(obj: Any) -> Any:
    """Plain dicts and lists as ruamel's commented nodes (lists of scalars in flow style: [a, b])."""
    if isinstance(obj, dict):
        return CommentedMap((k, _commented(v)) for k, v in obj.items())
    if isinstance(obj, list):
        seq = CommentedSeq(_commented(v) for v in obj)
        if all(not isinstance(v, dict | list) for v in obj):
            seq.fa.set_flow_style()
        return seq
    return obj
