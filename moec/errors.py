"""Errors a user can fix. The CLIs print them as one line and exit 2; `--debug` shows the traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception's first line of text (its type's name if it has none), cut at `limit`: what a
    one-line error quotes of a failure deep inside torch."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


class MoecError(Exception):
    """Something wrong with the user's input: the message names what and how to fix it."""

    exit_code = 2


class RecipeError(MoecError):
    """The recipe, or the model it points to, cannot be compiled as written."""


class ArtifactError(MoecError):
    """An artifact directory is missing, damaged, or built for something else."""


class RequestError(MoecError):
    """A generation request the compiled model cannot serve (too long, too many prompts, bad parameters)."""


class LoweringError(MoecError):
    """A compiler pass produced a graph that does not compute what the model computes."""


class CudaGraphError(MoecError):
    """Decode CUDA graphs could not be captured on this GPU; loading without them works."""


def run_cli(main: Callable[[], int | None], debug: bool) -> int:
    """Run a CLI body: MoecError becomes one line on stderr and exit 2, unless debugging."""
    try:
        return main() or 0
    except MoecError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
