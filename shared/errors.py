"""The base of every error that is the user's to fix (bad arguments, inputs or files).

The command line prints these as one line and exits with status 2; anything
else is a bug and keeps its traceback.
"""
import errno


class QrobustError(Exception):
    """An error whose message tells the user what to change."""


USER_ERRORS = (QrobustError,)

# errno of a write refused for lack of space (full disk, quota, file size limit): the user frees
# space and reruns; the command line says so in one line.
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
