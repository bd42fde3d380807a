"""Errors that the command line turns into one clear line and an exit code."""


class UsageError(Exception):
    """Bad input or configuration: reported as one line, exit code 2, nothing written."""

    exit_code = 2


class EnvironmentProblem(Exception):
    """Something the machine lacks (a library, a build feature): one line with the fix, exit code 1."""

    exit_code = 1
