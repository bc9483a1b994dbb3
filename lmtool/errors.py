"""The one exception type for user mistakes; the CLI turns it into a single line and an exit code."""


class LmtoolError(Exception):
    """A problem the user can fix (bad input, bad config, missing file). Exit code 2 by default."""

    exit_code = 2


class TrainingFailed(LmtoolError):
    """Training could not go on for a reason found at run time (not a usage mistake)."""

    exit_code = 1


class Interrupted(LmtoolError):
    """The user pressed Ctrl-C; what was saved so far stays intact."""

    exit_code = 130
