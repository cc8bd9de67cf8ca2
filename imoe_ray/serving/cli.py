"""`imoe api-keys create|list|revoke` (registered in imoe_ray/cli.py): the keys `imoe serve` checks.
A refused command exits with status 2 and one line saying why."""

from __future__ import annotations

import enum
import functools
import json
from typing import Optional

import click
import typer
from rich.console import Console
from rich.table import Table

from imoe_ray.serving.auth import ApiKeyError

console = Console(stderr=True)
keys_app = typer.Typer(help="API keys: who may call the served API (imoe serve), with roles and limits.",
                       no_args_is_help=True)
StoreOpt = typer.Option("store", "--store", "-s", help="Store directory or URI the server serves.")


class _Role(str, enum.Enum):
    user = "user"
    admin = "admin"


class Refused(click.ClickException):
    exit_code = 2


def _refusals(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from imoe_ray.store import StoreError, StoreLocked

        try:
            return fn(*args, **kwargs)
        except (ApiKeyError, StoreLocked, StoreError) as e:
            raise Refused(str(e)) from None
    return wrapper


def _store(store: str):
    from imoe_ray.store import Store

    return Store(store, create=False)


@keys_app.command("create")
@_refusals
def create(name: str = typer.Argument(..., help="The key's name: the caller's identity (jobs, learning, logs)."),
           store: str = StoreOpt,
           role: _Role = typer.Option(_Role.user, "--role", help="admin: also sees and cancels every key's jobs."),
           max_priority: Optional[int] = typer.Option(None, "--max-priority", min=0,
                                                      help="Highest job priority this key may use."),
           rate: Optional[float] = typer.Option(None, "--rate", min=0.001,
                                                help="Requests per second (bursts of twice that)."),
           no_learn: bool = typer.Option(False, "--no-learn", help="Never learn this key's answers into the knowledge base.")) -> None:
    """Create a key and print it once, as JSON (`name`, `key`, `role`); only its SHA-256 is stored."""
    from imoe_ray.serving.auth import create_key

    record, secret = create_key(_store(store), name, role.value, max_priority, rate, not no_learn)
    print(json.dumps({"name": record.name, "key": secret, "role": record.role,
                      "max_priority": record.max_priority, "rate": record.rate, "learn": record.learn}))
    console.print("[dim]Store the key now: it is not shown again. Clients send it as "
                  "`Authorization: Bearer KEY` (the openai client's api_key).[/dim]")


@keys_app.command("list")
@_refusals
def list_keys(store: str = StoreOpt, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """The store's keys (names, roles, limits; never the keys)."""
    from imoe_ray.serving.auth import load_keys

    keys = load_keys(_store(store)).keys
    if as_json:
        print(json.dumps([k.public() for k in keys]))
        return
    table = Table(title=f"{len(keys)} API keys" + ("" if keys else ": the server is open to every caller"))
    for col in ("name", "role", "max priority", "rate (req/s)", "learn"):
        table.add_column(col)
    for k in keys:
        table.add_row(k.name, k.role, "" if k.max_priority is None else str(k.max_priority),
                      "" if k.rate is None else f"{k.rate:g}", "yes" if k.learn else "no")
    Console().print(table)


@keys_app.command("revoke")
@_refusals
def revoke(name: str = typer.Argument(..., help="The key's name."), store: str = StoreOpt) -> None:
    """Revoke a key: a running server refuses it within a second."""
    from imoe_ray.serving.auth import revoke_key

    revoke_key(_store(store), name)
    console.print(f"revoked {name}")
