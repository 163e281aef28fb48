"""Errors of mapperdsl: one root, a class per stage.

::

    MapperError
    ├── DeclarationError      the mapping itself is wrong (no database needed to see it)
    ├── PlanError             the mapping does not fit the databases (missing column, bad type)
    ├── ExecutionError        running the plan failed
    │   ├── TransientError    worth retrying: connection lost, deadlock, database locked
    │   ├── TerminalError     retrying will not help
    │   └── LeaseHeldError    another job of the mapping is running: this run is refused
    ├── MergeError            the target refused a chunk's writes
    └── CheckpointError       the checkpoint or job log is not in the state the run needs
        ├── UnfinishedJobError  a job of the mapping must be resumed or abandoned first
        └── NoSuchJobError      the job log has no job of the id given

Every message names what is wrong, the bad value and what is allowed. Messages
never carry a password: :func:`mapperdsl.dsl.url.redact_text` scrubs them.
"""

from __future__ import annotations


class MapperError(Exception):
    """Root of every error mapperdsl raises on purpose."""


class DeclarationError(MapperError, ValueError):
    """The mapping is wrong in itself: raised by the builder call that made it wrong."""

    def __init__(self, problems: str | list[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(_join(self.problems))


class PlanError(MapperError):
    """The mapping does not fit the databases; raised before anything is written."""

    def __init__(self, problems: str | list[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(_join(self.problems))


class ExecutionError(MapperError):
    """Running a plan failed."""


class TransientError(ExecutionError):
    """A failure that a retry may cure (connection lost, deadlock, locked database)."""


class TerminalError(ExecutionError):
    """A failure that a retry will not cure."""


class LeaseHeldError(ExecutionError):
    """Another job of the same mapping is running against the target: the run is refused."""


class MergeError(MapperError):
    """The target refused a chunk's writes."""


class CheckpointError(MapperError):
    """The checkpoint or the job log is not in the state the run needs."""


def _join(problems: list[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems:\n" + "\n".join(f"- {p}" for p in problems)


class UnfinishedJobError(CheckpointError):
    """The mapping has a failed, stopped or dead job: resume it or abandon it first."""


class NoSuchJobError(CheckpointError):
    """The job log of the target has no job of the id given (resume, abandon, stop)."""

    def __init__(self, job_id: str, target: object) -> None:
        super().__init__(f"there is no job {job_id!r} in the job log of {target}")
