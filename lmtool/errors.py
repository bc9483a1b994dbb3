"""The one exception type for user mistakes; the CLI turns it into a single line and an exit code."""

from __future__ import annotations


class LmtoolError(Exception):
    """A problem the user can fix (bad input, bad config, missing file). Exit code 2 by default."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class TrainingFailed(LmtoolError):
    """Training could not go on for a reason found at run time (not a usage mistake)."""

    exit_code = 1


class Interrupted(LmtoolError):
    """The user pressed Ctrl-C; what was saved so far stays intact."""

    exit_code = 130


def non_finite_scores() -> LmtoolError:
    """A model whose scores are NaN or infinite (weights overwritten with them): sampling, scoring and
    evaluation all refuse it rather than print NaN, which is not JSON either."""
    return LmtoolError("the model produced non-finite scores; the model file may be damaged: retrain or restore it")


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """"1 epoch", "2 epochs", "1,004 steps": a count as messages write it."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"
