"""`safepatch` command line. Each subcommand lives in its own module and is registered here."""

from __future__ import annotations

import typer

cli = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)


def _register() -> None:
    # Imported lazily so `safepatch --help` stays fast and one broken optional piece does not
    # take the whole CLI down.
    from app.cli import serve

    cli.command("serve")(serve.serve)
    cli.command("convert-model")(serve.convert_model)
    for module_name, command_name, func_name in (
        ("app.cli.score", "score", "score"),
        ("app.cli.train", "train", "train"),
        ("app.cli.evaluate", "eval", "evaluate"),
    ):
        try:
            module = __import__(module_name, fromlist=[func_name])
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        cli.command(command_name)(getattr(module, func_name))


def main() -> None:
    _register()
    cli()
