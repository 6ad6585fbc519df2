"""argparse types of every command: a number the shell gave, parsed; its range is the validated
request's to check (one place for every entrance, the API's too)."""
from __future__ import annotations

import argparse


def integer(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got '{s}'") from None


def number(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{s}'") from None
