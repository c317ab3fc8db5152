"""The `chromobatch` app: the Typer app, the global options, settings and logging, and `friendly`.

The commands live in the modules of their group (cases, review, models, admin), registered on `app` by
`chromobatch.cli`. Any ChromobatchError becomes one red line on stderr, a hint, and exit code 1.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from chromobatch import __version__
from chromobatch.config import ENV_PREFIX, Settings, load_settings
from chromobatch.errors import ChromobatchError

app = typer.Typer(help="Batch chromosome classification and karyogram reports for cytogenetics labs.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

_state: dict[str, Any] = {"config": None}
F = TypeVar("F", bound=Callable[..., Any])

DbOpt = Annotated[str | None, typer.Option("--db", help="SQLite path or database URL (postgresql+psycopg://...).")]


def friendly(func: F) -> F:
    """Turn library errors into one red line plus a hint, exit code 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ChromobatchError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            if exc.hint:
                typer.echo(f"hint: {exc.hint}", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def settings(**overrides: Any) -> Settings:
    cfg = load_settings(overrides, config_file=_state["config"])
    _apply_file_mode(cfg)
    return cfg


def _apply_file_mode(cfg: Settings) -> None:
    """file_mode -> the process umask, so that every file this command (and SQLite, and its children)
    creates gets that mode; empty leaves the umask the command was started with (systemd: UMask=)."""
    if cfg.file_mode:
        from chromobatch.files import umask_for_mode

        os.umask(umask_for_mode(int(cfg.file_mode, 8)))


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("alembic").setLevel(logging.WARNING)  # migrations are routine, not news


def _version(value: bool) -> None:
    if value:
        typer.echo(f"chromobatch {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    config: Annotated[Path | None, typer.Option("--config", help="Settings file (default ./chromobatch.toml).")]
    = None,
    log_level: Annotated[str | None, typer.Option("--log-level", help="DEBUG, INFO, WARNING, ERROR.")] = None,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True)] = False,
) -> None:
    _state["config"] = config
    try:
        cfg: Settings | None = load_settings(config_file=config)
    except ChromobatchError:
        cfg = None  # the command reports it, if it reads the settings
    setup_logging(log_level or (cfg.log_level if cfg is not None else "INFO"))
    if cfg is not None:
        _apply_file_mode(cfg)  # before any command creates a file, also those that never call settings()


def setting_help(text: str, name: str, *, show_default: bool = False) -> str:
    """Help of an option that overrides the setting `name` (default None: the setting applies): names its
    environment variable (and the setting's default) the way Typer shows an option's own."""
    default = {f.name: f.default for f in fields(Settings)}[name]
    bracket = "\\[" if app.rich_markup_mode == "rich" else "["  # rich markup would take [...] for a style
    return (f"{text} {bracket}env var: {ENV_PREFIX}{name.upper()}]"
            + (f" {bracket}default: {default}]" if show_default else ""))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
