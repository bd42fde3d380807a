"""Errors that the command line turns into one clear line and an exit code."""


class UsageError(Exception):
    """Bad input or configuration: reported as one line, exit code 2, nothing written."""

    exit_code = 2


class EnvironmentProblem(Exception):
    """Something the machine lacks (a library, a build feature): one line with the fix, exit code 1."""

    exit_code = 1


class TrainingFailure(Exception):
    """A failure the ranks found together (replicas that drifted apart): every rank raises the same
    one, rank 0 prints it as one line, exit code 1."""

    exit_code = 1
