"""Command line: `python -m bookrun {build,run,reference,notebooks,params} ...` (see README)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from papermill.exceptions import PapermillExecutionError

from bookrun.chapters import CHAPTERS, PROFILES, get_chapter
from kdlib.config import ConfigError
from kdlib.hub import HubUnavailableError
from kdlib.registry import ModelNotAvailableError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bookrun", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p_build = sub.add_parser("build", help="execute every chapter under a profile and build the HTML")
    p_build.add_argument("--profile", default="default", choices=PROFILES)
    p_build.add_argument("--chapters", nargs="*", choices=list(CHAPTERS), help="default: all")
    p_build.add_argument("--no-execute", action="store_true", help="build pages without running code")

    p_run = sub.add_parser("run", help="rerun one chapter with parameter overrides")
    p_run.add_argument("chapter", choices=list(CHAPTERS))
    p_run.add_argument("--profile", default="default", choices=PROFILES)
    p_run.add_argument(
        "-p",
        "--param",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="override one parameter (repeatable); VALUE is read as YAML: 4, 2.5, [1, 2], text",
    )
    p_run.add_argument("--output-dir", type=Path, help="default: _build/outputs/<profile>/<chapter>")

    p_notebooks = sub.add_parser(
        "notebooks", help="write runnable .ipynb notebooks (no outputs) for a workshop"
    )
    p_notebooks.add_argument("--profile", default="default", choices=PROFILES)
    p_notebooks.add_argument("--out", type=Path, default=Path("_build/notebooks"))

    p_reference = sub.add_parser(
        "reference", help="run a chapter at its reference profile and replace its committed record"
    )
    p_reference.add_argument("chapter", choices=list(CHAPTERS))
    p_reference.add_argument(
        "--allow-uncommitted",
        action="store_true",
        help="run although what decides the numbers has uncommitted changes (the record says so)",
    )

    p_params = sub.add_parser("params", help="list a chapter's parameters, types, defaults, meaning")
    p_params.add_argument("chapter", choices=list(CHAPTERS))

    args = parser.parse_args(argv)
    from bookrun import execute, notebooks, params

    try:
        if args.command == "params":
            print(params.describe(get_chapter(args.chapter)))
        elif args.command == "notebooks":
            for path in notebooks.write_notebooks(list(CHAPTERS.values()), args.profile, args.out):
                print(path)
        elif args.command == "reference":
            from bookrun.records import run_reference

            run_reference(get_chapter(args.chapter), allow_dirty=args.allow_uncommitted)
        elif args.command == "run":
            overrides = {name: params.parse_value(value) for name, value in args.param}
            execute.run_chapter(get_chapter(args.chapter), args.profile, overrides, args.output_dir)
        else:
            execute.build(args.profile, args.chapters, execute_chapters=not args.no_execute)
    except (ConfigError, HubUnavailableError, ModelNotAvailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except PapermillExecutionError as err:
        print(
            f"error: a cell failed ({err.ename}: {err.evalue}); the executed notebook holds the traceback.",
            file=sys.stderr,
        )
        return 1
    except subprocess.CalledProcessError as err:
        print(
            f"error: the book build failed (exit {err.returncode}); its warnings are above.", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
