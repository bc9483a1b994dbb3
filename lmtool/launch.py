"""The `lmtool` command's entry point. It imports the CLI itself, so that Ctrl-C while typer, rich and the
commands load is one line on stderr like any other interruption, not a Python traceback."""

import sys


def main() -> None:
    try:
        from lmtool.cli import main as cli_main
    except KeyboardInterrupt:
        print("lmtool: interrupted", file=sys.stderr)
        sys.exit(130)
    cli_main()
