"""``hpo submit``: a study from a spec file or a W&B sweep config, the worker commands to run
next, and ``--wait`` following the study's progress."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import ValidationError

from hpo_service.cli._common import (
    DEFAULT_SERVER,
    ServerOpt,
    TokenOpt,
    _api_error,
    _client,
    _fail,
    console,
    load_yaml_model,
)
from hpo_service.cli.studies import _counts_line
from hpo_service.client import ClientError, HPOClient
from hpo_service.schemas import StudyInfo, StudySpec
from hpo_service.wandb_sweep import SweepUntranslatable, is_wandb_sweep
from hpo_service.wandb_sweep import translate as translate_sweep


def load_spec(path: Path) -> StudySpec:
    """A study spec from YAML or JSON; raises ``typer.Exit(2)`` naming the bad field."""
    return load_yaml_model(path, StudySpec, "spec")


def submit(
    spec_file: Annotated[
        Path, typer.Argument(help="Study spec, or a W&B sweep config (YAML or JSON).")
    ],
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    wait: Annotated[bool, typer.Option(help="Follow progress until the study ends.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print a W&B sweep's translation; submit nothing.")
    ] = False,
) -> None:
    """Create a study from a spec file (a W&B sweep config is translated and printed first)."""
    # --- bring your own code: W&B sweeps and the worker command to run next (issue 15) ---
    program = None
    if is_wandb_sweep(_raw_yaml(spec_file)):
        spec, program = _translate_sweep(spec_file)
    else:
        spec = load_spec(spec_file)
    if dry_run:
        return
    # ---
    client = _client(server, token)
    try:
        info = client.create_study(spec)
    except ClientError as error:
        raise _api_error(error, server) from error
    console.print(f"created study [bold]{info.name}[/bold] → {info.links.get('self', '')}")
    _print_worker_commands(server, program)
    if wait:
        _follow(client, info.name)


# --- bring your own code (issue 15): W&B sweep files and the worker commands -----------------


def _raw_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None  # load_spec reports it


def _translate_sweep(path: Path) -> tuple[StudySpec, list[str] | None]:
    try:
        translation = translate_sweep(_raw_yaml(path), fallback_name=path.stem)
    except SweepUntranslatable as error:
        raise _fail(str(error), 2) from error
    except ValidationError as error:
        lines = "\n".join(
            f"  {'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}" for e in error.errors()
        )
        raise _fail(f"the W&B sweep {path} translates to an invalid spec:\n{lines}", 2) from error
    full = translation.spec.model_dump(mode="json", exclude_none=True)
    body = {key: full[key] for key in full if key not in ("drop", "max_retries")}
    body["drop"] = ", ".join(translation.spec.drop) + " (defaults the sweep does not list)"
    console.print(f"W&B sweep {path} → study spec:")
    text = yaml.safe_dump(body, sort_keys=False, width=1000).rstrip()
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    for note in translation.notes:
        console.print(f"  note: {note}", markup=False, highlight=False, soft_wrap=True)
    return translation.spec, translation.program


def _print_worker_commands(server: str, program: list[str] | None) -> None:
    """What to run next: the built-in trainer, your code through the SDK, or any program."""
    agent = " ".join(program) if program else "./train.sh"
    lines = [
        "run workers next, one per GPU — whichever fits your code:",
        f"  built-in VAE trainer:  hpo-worker --server {server} --device cuda:0",
        f"  your Python loop:      for trial in hpo_service.sdk.trials({server!r}): ..."
        "  (examples/own_vae/train.py)",
        f"  any program:           hpo agent --server {server} -- {agent}",
    ]
    console.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)


def _follow(client: HPOClient, name: str, poll_s: float = 2.0) -> StudyInfo:
    last = ""
    while True:
        info = client.get_study(name)
        line = _counts_line(info)
        if line != last:
            console.print(line)
            last = line
        if info.state in ("completed", "failed") or (
            info.state in ("stopped", "cancelled") and info.counts.running == 0
        ):
            return info
        time.sleep(poll_s)
