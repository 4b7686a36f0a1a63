"""The ``easyanimate serve`` command (wired into ``easyanimate/cli.py``); also runnable on its own:
``python -m easyanimate.serving.cli [MODEL] [--host H] [--port P] [--params FILE]``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def serve(
    model: Optional[str] = typer.Argument(
        None,
        help="models:/NAME@ALIAS, models:/NAME/VERSION or a saved pyfunc model folder "
        "(default: models:/<registry.model_name>@<registry.champion_alias>)",
    ),
    host: Optional[str] = typer.Option(None, help="interface to bind (default: serve.host, 127.0.0.1)"),
    port: Optional[int] = typer.Option(None, help="port (default: serve.port)"),
    log_level: str = typer.Option("info", help="debug | info | warning | error"),
    params: Optional[Path] = typer.Option(
        None, "--params", "-p", help="params file (default: params.yaml or $EASYANIMATE_PARAMS)"
    ),
) -> None:
    """Serve a registered model over HTTP (MLflow's /invocations JSON, plus /health), with bounded work: a
    per-request budget (generate.max_request_budget, generate.max_records_per_request), a deadline
    (serve.request_timeout_s), cancellation when the client disconnects, a bounded queue (serve.max_queue) and
    a graceful drain on SIGTERM (serve.shutdown_grace_s)."""
    from easyanimate.config import ConfigError, load_settings
    from easyanimate.runtime import configure_environment

    configure_environment()
    try:
        settings = load_settings(params)
    except ConfigError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    from mlflow.exceptions import MlflowException

    from easyanimate.serving.server import serve as run_server

    uri = model or f"models:/{settings.registry.model_name}@{settings.registry.champion_alias}"
    try:
        run_server(settings, uri, host=host, port=port, log_level=log_level)
    except (MlflowException, OSError, ValueError) as exc:
        typer.secho(f"serve {uri}: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


def main() -> None:
    typer.run(serve)


if __name__ == "__main__":
    main()
