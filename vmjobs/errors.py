"""Errors a user can act on. Each carries one line that the CLI prints as is."""


class VmjobsError(Exception):
    """A failure with a one-line message meant for the user; exit code 1 unless set."""

    exit_code = 1


class UsageError(VmjobsError):
    """Bad input from the user (an option, a job spec): exit code 2, as for click's own."""

    exit_code = 2


class ConfigError(VmjobsError):
    def __init__(self, path: str, key: str, problem: str) -> None:
        super().__init__(f"{path}: {key}: {problem}")
        self.path, self.key, self.problem = path, key, problem


class NotFound(VmjobsError):
    """An unknown host, image or job."""


class DoesNotFit(VmjobsError):
    """A request that cannot be placed (now or ever)."""


class UnsafeOutput(VmjobsError):
    """The guest's output archive broke a rule and was refused."""
