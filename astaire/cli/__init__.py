"""The ``astaire`` command line: one subcommand per operator task."""
from __future__ import annotations

import argparse
import sys

from astaire import __version__


class _VersionAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        from astaire import codec  # imported only here: building the parser stays cheap

        build = f", {codec.BUILD} build" if codec.BUILD else ""
        print(f"astaire {__version__} (codec: {codec.IMPLEMENTATION}{build})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="astaire",
        description="Astaire actively resynchronises a memcached cluster (Project Clearwater "
        "MemcachedStore layout: 128 vbuckets, 2 replicas) while it is resized: it streams the "
        "vbuckets the local memcached newly owns off their old replicas and writes them in, "
        "never overwriting newer data.",
    )
    parser.add_argument("--version", action=_VersionAction, nargs=0,
                        help="show the version and which codec implementation is loaded, and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    from astaire.cli import commands, view
    from astaire import demo

    view.register(sub)
    commands.register(sub)
    demo.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
