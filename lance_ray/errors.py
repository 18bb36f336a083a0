"""The errors lance-ray reports to a user, one class per kind of failure.

Every layer raises these (or subclasses); only the command line turns them into exit codes, in one
table (`lance_ray.cli.exit_codes`). A row that fails is not an error here: it becomes an output row
with `error` set.
"""

from __future__ import annotations


class LanceRayError(Exception):
    """Something lance-ray cannot do; the message says what and, where it can, what to do."""


class JobFileError(LanceRayError):
    """The job file (or a command-line argument standing in for part of it) is wrong. Nothing ran."""


class InputError(JobFileError):
    """A step's input as a whole is unusable: nothing matched, an unreadable table, duplicate ids."""


class ClusterError(LanceRayError):
    """A Ray cluster could not be reached, or refused the request (auth, version, unknown job)."""


class RunError(LanceRayError):
    """The run itself failed (a checkpoint group died, storage failed); committed rows are kept."""
