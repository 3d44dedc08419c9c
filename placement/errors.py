"""Errors the engine raises. "Does not fit" is never an error: it is a `Decision` with reasons."""

from __future__ import annotations


class Conflict(Exception):
    """An allocation overlaps what is already held, or names hardware the host does not have."""


class UnknownJob(KeyError):
    """`release` of a job that holds nothing."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id

    def __str__(self) -> str:  # KeyError would print the repr of its argument
        return f"job {self.job_id!r} holds nothing"


class UnknownHost(KeyError):
    """A host name the cluster does not know."""

    def __init__(self, host: str) -> None:
        super().__init__(host)
        self.host = host

    def __str__(self) -> str:
        return f"unknown host {self.host!r}"
