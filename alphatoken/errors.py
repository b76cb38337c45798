"""UserError: a problem with the user's input, reported by the CLI as one line without a traceback.

Raise it where bad input enters (a missing file, a malformed line, a missing field, an unwritable output),
with what is wrong, where (file and line when there is one) and the fix::

    raise UserError(f"{path}:{lineno}: not valid JSON ({err.msg}); each line must be one JSON object")

`alphatoken.cli.main` prints `alphatoken: error: <message>` on stderr and exits with status 2.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: the CLI prints the message as one line and exits non-zero."""

    exit_code = 2

    def __init__(self, message: str):
        # Keep the message on one line: the CLI promises one-line errors.
        super().__init__(" ".join(str(message).split()))

    @property
    def message(self) -> str:
        return str(self)
