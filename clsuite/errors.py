"""User-facing errors: the CLI prints them on one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix."""


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss; the run is recorded as failed."""
