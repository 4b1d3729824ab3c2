"""What every ``hpo`` command shares: the console, the --server/--token/--json options, the REST
client, and errors printed once (a refused field per line, a bad spec file's field and reason)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.markup import escape

from hpo_service.client import APIError, ClientError, HPOClient, make_http_client

console = Console()

ServerOpt = Annotated[
    str, typer.Option("--server", envvar="HPO_SERVER_URL", help="Base URL of the server.")
]
TokenOpt = Annotated[
    str | None, typer.Option("--token", envvar="HPO_TOKEN", help="API token (admin/viewer).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
DEFAULT_SERVER = "http://127.0.0.1:8000"


def _print_json(data: Any) -> None:
    """Plain JSON on stdout (not through rich: no markup, no wrapping), for scripts and jq."""
    print(json.dumps(data, indent=2))


def _client(server: str, token: str | None) -> HPOClient:
    return HPOClient(make_http_client(server, token))


def _fail(message: str, code: int = 1) -> typer.Exit:
    # soft_wrap: off a terminal rich would break the message at 80 columns, mid-phrase.
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


def _field(location: str) -> str:
    """A field as the user wrote it: the request body's ``body.`` prefix dropped."""
    return location.removeprefix("body.")


def _reason(text: str) -> str:
    return text.removeprefix("Value error, ")


def _api_error(error: ClientError, server: str | None = None) -> typer.Exit:
    """The error once: each refused field on its own line (no summary repeating them), and on a
    connection failure the URL that could not be reached."""
    if isinstance(error, APIError) and error.details:
        lines = "\n".join(
            f"  {_field(str(d.get('field')))}: {_reason(str(d.get('reason')))}"
            for d in error.details
        )
        return _fail(f"the server refused the request ({error.status} {error.code}):\n{lines}", 2)
    if isinstance(error, APIError):
        return _fail(f"{error.status} {error.code}: {_reason(error.message)}", 2)
    where = f"cannot reach the server at {server}" if server else "cannot reach the server"
    return _fail(f"{where} ({error}); is it running? (--server, HPO_SERVER_URL)", 1)


ModelT = TypeVar("ModelT", bound=BaseModel)


def load_yaml_model(path: Path, model: type[ModelT], what: str) -> ModelT:
    """A ``model`` from a YAML or JSON file; raises ``typer.Exit(2)`` naming the bad field."""
    try:
        with path.open() as stream:  # a stream, so YAML errors name the file
            data = yaml.safe_load(stream)
    except (OSError, yaml.YAMLError) as error:
        raise _fail(f"cannot read {path}: {error}", 2) from error
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise _fail(f"invalid {what} {path}:\n{_validation_lines(error, what)}", 2) from error


def _validation_lines(error: ValidationError, what: str) -> str:
    """One line per error: ``field: reason``. Whole-model checks name their field in backticks
    at the start of the message (`search_space.batch_sise`: unknown parameter): use that."""
    lines = []
    for e in error.errors():
        field, reason = ".".join(str(p) for p in e["loc"]), _reason(str(e["msg"]))
        named = re.match(r"^`([^`]+)`:? (.*)$", reason, re.DOTALL)
        if named and not field:
            field, reason = named.group(1), named.group(2)
        lines.append(f"  {field or what}: {reason}")
    return "\n".join(lines)
