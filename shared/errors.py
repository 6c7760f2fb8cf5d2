"""The base of every error that is the user's to fix (bad arguments, inputs or files).

The command line prints these as one line and exits with status 2; anything
else is a bug and keeps its traceback.
"""


class QrobustError(Exception):
    """An error whose message tells the user what to change."""


USER_ERRORS = (QrobustError,)
