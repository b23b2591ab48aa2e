"""The one exception type for errors a user can cause (bad input, bad option, artifact mismatch)."""


class RefQSRError(Exception):
    """A problem the user can fix; the CLI prints its message on one line and exits non-zero."""
