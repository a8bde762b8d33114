"""The base class of the errors a user can act on: a bad config key, a missing or incompatible
checkpoint, a diverged run, a failed extension build, a bad space file, an unknown sweep.

Their messages say what to fix, so the CLI prints them as one line without a traceback; any other
exception is a bug and keeps its traceback. Each subclass also derives from the builtin it
refines (``ValueError``, ``RuntimeError``...), so ``except ValueError`` keeps working.
"""


class UserError(Exception):
    """An error whose message tells the user what to fix."""
