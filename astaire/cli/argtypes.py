"""Argument types shared by the subcommands: each turns bad text into a clear usage error."""
from __future__ import annotations

import argparse

from astaire.cluster.settings import parse_server_list


def server_list(text: str) -> list[str]:
    try:
        return parse_server_list(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def power_of_two(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if n < 1 or n & (n - 1):
        raise argparse.ArgumentTypeError(f"{n} is not a power of two")
    return n


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} must be at least 1")
    return n


def number(convert, ok, requirement: str):
    """An argparse type: ``convert`` the text, then require ``ok(n)``."""

    def parse(text: str):
        try:
            n = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not ok(n):
            raise argparse.ArgumentTypeError(f"{text} {requirement}")
        return n

    return parse
