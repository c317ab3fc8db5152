"""The web review's commands: `serve` (the review workstation) and `users add|passwd|list|role` (its accounts).

chromobatch.cli registers them on the app.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

from chromobatch.cli.main import DbOpt, friendly, settings
from chromobatch.errors import UserError

users_app = typer.Typer(help="Accounts of the web review (viewer, reviewer, admin).", no_args_is_help=True)

PasswordOpt = Annotated[str | None, typer.Option("--password-stdin", help="Read the password from the first line "
                                                 "of standard input (for scripts) instead of asking twice.")]


def _password(from_stdin: bool) -> str:
    if from_stdin:
        import sys

        line = sys.stdin.readline().rstrip("\n")
        if not line:
            raise UserError("no password on standard input")
        return line
    return str(typer.prompt("Password", hide_input=True, confirmation_prompt=True))


@friendly
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only; put a TLS reverse "
                                           "proxy in front for others, see docs/deploy.md).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8080,
    secure_cookies: Annotated[bool, typer.Option("--secure-cookies/--no-secure-cookies",
                                                 help="Send the session cookie over HTTPS only (on behind a TLS "
                                                      "proxy).")] = False,
    proxy: Annotated[str, typer.Option("--proxy", help="Address(es) of the reverse proxy whose X-Forwarded-For "
                                                      "is trusted (comma-separated; '*': any, in a container).")]
    = "127.0.0.1",
    reports: Annotated[str | None, typer.Option("--reports", help="Where sign-off writes the re-rendered PDF "
                                                                  "(the reports_dir setting).")] = None,
    db: DbOpt = None,
) -> None:
    """The review workstation in the browser: case list, karyograms to edit, sign-off. Session key: the
    CHROMOBATCH_WEB_SECRET environment variable (else random: sessions end when it restarts)."""
    from pathlib import Path

    import uvicorn

    from chromobatch.store.db import connect
    from chromobatch.web.app import WebOptions, create_app
    from chromobatch.web.users import list_users

    cfg = settings(db=db, reports_dir=reports)
    database = connect(cfg.db)
    if not list_users(database):
        typer.secho("note: no user yet; add one with `chromobatch users add NAME --role reviewer`",
                    fg=typer.colors.YELLOW, err=True)
    options = WebOptions(reports_dir=Path(cfg.reports_dir), secret=os.environ.get("CHROMOBATCH_WEB_SECRET", ""),
                         cookie_secure=secure_cookies)
    typer.echo(f"chromobatch review on http://{host}:{port}/ (Ctrl-C stops it)")
    try:
        # access_log off: our middleware logs method, path without query string, status and user id
        uvicorn.run(create_app(database, options), host=host, port=port, access_log=False, log_config=None,
                    proxy_headers=True, forwarded_allow_ips=proxy)
    finally:
        database.dispose()


@users_app.command("add")
@friendly
def users_add(
    name: Annotated[str, typer.Argument(help="User name (letters, digits, . _ @ -).")],
    role: Annotated[str, typer.Option(help="viewer (reads), reviewer (edits, signs) or admin (also reopens any "
                                           "case).")] = "reviewer",
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the password from standard "
                                                                         "input.")] = False,
    db: DbOpt = None,
) -> None:
    """Add an account (the password is asked twice and stored as an argon2 hash)."""
    from chromobatch.store.db import connect
    from chromobatch.web.users import add_user, check_name, check_role

    check_name(name), check_role(role)
    password = _password(password_stdin)
    with connect(settings(db=db).db) as database:
        user = add_user(database, name, role, password)
    typer.echo(f"user {user.name} added ({user.role})")


@users_app.command("passwd")
@friendly
def users_passwd(
    name: Annotated[str, typer.Argument(help="User name.")],
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the password from standard "
                                                                         "input.")] = False,
    db: DbOpt = None,
) -> None:
    """Set a new password (the user's open sessions end)."""
    from chromobatch.store.db import connect
    from chromobatch.web.users import set_password

    password = _password(password_stdin)
    with connect(settings(db=db).db) as database:
        set_password(database, name, password)
    typer.echo(f"password of {name} changed")


@users_app.command("role")
@friendly
def users_role(name: Annotated[str, typer.Argument(help="User name.")],
               role: Annotated[str, typer.Argument(help="viewer, reviewer or admin.")], db: DbOpt = None) -> None:
    """Change an account's role."""
    from chromobatch.store.db import connect
    from chromobatch.web.users import set_role

    with connect(settings(db=db).db) as database:
        user = set_role(database, name, role)
    typer.echo(f"user {user.name} is now {user.role}")


@users_app.command("disable")
@friendly
def users_disable(name: Annotated[str, typer.Argument(help="User name.")], db: DbOpt = None) -> None:
    """Disable an account: no more sign-ins, open sessions end (the name stays in the audit trail)."""
    from chromobatch.store.db import connect
    from chromobatch.web.users import set_active

    with connect(settings(db=db).db) as database:
        set_active(database, name, False)
    typer.echo(f"user {name} disabled")


@users_app.command("enable")
@friendly
def users_enable(name: Annotated[str, typer.Argument(help="User name.")], db: DbOpt = None) -> None:
    """Enable a disabled account again."""
    from chromobatch.store.db import connect
    from chromobatch.web.users import set_active

    with connect(settings(db=db).db) as database:
        set_active(database, name, True)
    typer.echo(f"user {name} enabled")


@users_app.command("list")
@friendly
def users_list(db: DbOpt = None) -> None:
    """List the accounts and their roles."""
    from chromobatch.store.db import connect
    from chromobatch.web.users import list_users

    with connect(settings(db=db).db) as database:
        users = list_users(database)
    if not users:
        typer.echo("no users; add one with `chromobatch users add NAME --role reviewer`")
    for u in users:
        created = u.created_at.strftime("%Y-%m-%d") if u.created_at else "-"
        typer.echo(f"{u.name:<24} {u.role:<9} {'active' if u.active else 'disabled':<8} created {created}")
