"""The one base class of the errors a user can act on.

The CLI prints such an error as one line and exits 1; anything else is a bug and keeps its traceback. Every error
class that names something the user must change (a path, a setting, an unreachable server) inherits from it, and from
the built-in type it used to be, so callers that catch ``ValueError`` or ``RuntimeError`` still do.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user must change; the message says what, in one line."""
