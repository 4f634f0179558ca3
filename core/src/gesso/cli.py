"""The ``gesso`` command line: generate | run | plugins | config | batch.

Usage errors (a bad key, a missing file, an unknown model) print one line naming what to fix and
exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any


def _usage_errors() -> tuple[type[BaseException], ...]:
    from gesso.config import ConfigError
    from gesso.configuration import ConfigFileError
    from gesso.loading import ModelNotFoundError
    from gesso.output import MetadataError
    from gesso.pipeline_loading import ComponentLoadError
    from gesso.registry import FamilyNotFoundError, RegistrationError
    from gesso.weights import WeightsError

    return (
        ConfigError,
        ConfigFileError,
        ModelNotFoundError,
        MetadataError,
        ComponentLoadError,
        FamilyNotFoundError,
        RegistrationError,
        WeightsError,
        LookupError,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gesso", description="Plugin-based text-to-image generation.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="generate images from a prompt")
    generate.add_argument("prompt", help="the text prompt")
    generate.add_argument("--model", help="Hub repository id or local folder (default: stable-diffusion-v1-5/stable-diffusion-v1-5)")
    generate.add_argument("--out", help="output folder (default: outputs)")
    generate.add_argument("--quiet", action="store_true", help="no progress bar")
    generate.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="run-config overrides, e.g. seed=7 height=768")

    run = commands.add_parser("run", help="run a config file, or replay the config stored in an image")
    run.add_argument("config", nargs="?", help="run-config YAML file")
    run.add_argument("--from", dest="from_image", metavar="IMAGE", help="replay the run stored in a gesso PNG")
    run.add_argument("--out", help="output folder (overrides output.dir)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE")

    plugins = commands.add_parser("plugins", help="list plugins, what they register, and load failures")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")

    config = commands.add_parser("config", help="inspect run configs")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    show = config_commands.add_parser("show", help="print the resolved config")
    show.add_argument("config", nargs="?", help="run-config YAML file")
    show.add_argument("--model", help="Hub repository id or local folder")
    show.add_argument("overrides", nargs="*", metavar="KEY=VALUE")

    from gesso.batching import add_batch_parser

    add_batch_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [token for token in extra if token.startswith("-") or "=" not in token or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]  # KEY=VALUE pairs given after options
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("gesso: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        if isinstance(err, _usage_errors()):
            print(f"gesso: error: {_one_line(err)}", file=sys.stderr)
            return 2
        print(f"gesso: error: {type(err).__name__}: {_one_line(err)} (run with --debug for the traceback)", file=sys.stderr)
        return 1


def _one_line(err: BaseException) -> str:
    text = str(err.args[0]) if isinstance(err, LookupError) and err.args else str(err)
    return " ".join(text.split()) or type(err).__name__


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "plugins":
        return _plugins(args)
    if args.command == "config":
        return _config_show(args)
    if args.command == "batch":
        from gesso.batching import run_batch_command

        return run_batch_command(args)
    return _generate_or_run(args)


def _generate_or_run(args: argparse.Namespace) -> int:
    from gesso.config import ConfigError
    from gesso.runner import run

    overrides = list(args.overrides)
    config: Any = None
    if args.command == "generate":
        overrides.insert(0, f"prompt={_quote(args.prompt)}")
        if args.model:
            overrides.insert(0, f"model={_quote(args.model)}")
    elif args.from_image:
        from omegaconf import OmegaConf

        from gesso.output import read_run_config

        if args.config:
            raise ConfigError("give a config file or --from IMAGE, not both")
        config = OmegaConf.create(read_run_config(args.from_image))
    elif args.config:
        config = args.config
    else:
        raise ConfigError("gesso run needs a config file or --from IMAGE")
    if args.out:
        overrides.append(f"output.dir={_quote(args.out)}")
    result = run(config, overrides, progress=not args.quiet and sys.stderr.isatty())
    for path in result.paths:
        print(path)
    if result.nsfw_content_detected and any(result.nsfw_content_detected):
        flagged = [str(p) for p, f in zip(result.paths, result.nsfw_content_detected, strict=False) if f]
        print(f"gesso: the safety checker flagged {', '.join(flagged)} (written black)", file=sys.stderr)
    return 0


def _quote(value: str) -> str:
    """Quote a value for OmegaConf's dotlist so it stays one string (commas, colons, quotes)."""
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def _plugins(args: argparse.Namespace) -> int:
    from gesso.plugins import PluginHost

    host = PluginHost(strict=False)
    report = host.report()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for plugin in report["plugins"]:
        origin = (
            f"{plugin['distribution']} {plugin['version']}"
            if plugin["distribution"]
            else ("built-in" if plugin["builtin"] else "registered")
        )
        print(f"{plugin['name']} ({origin})")
        for kind, names in plugin["registers"].items():
            print(f"  {kind}: {', '.join(names)}")
    for failure in report["failures"]:
        dist = f" [{failure['distribution']}]" if failure["distribution"] else ""
        print(f"FAILED {failure['name']}{dist} at {failure['stage']}: {failure['error']}")
    return 0


def _config_show(args: argparse.Namespace) -> int:
    from gesso.config import to_yaml
    from gesso.runner import resolve_config

    overrides = list(args.overrides)
    if args.model:
        overrides.insert(0, f"model={_quote(args.model)}")
    print(to_yaml(resolve_config(args.config, overrides)), end="")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
