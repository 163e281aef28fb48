"""mapperdsl: load database tables into SCD1/SCD2 dimension tables.

Declare a mapping with a fluent DSL, preview its plan of key-range chunks, and
run it in parallel with joblib; each chunk reads with ConnectorX, diffs with a
stable Polars row hash and merges in one transaction.

>>> import mapperdsl as md
>>> dim = md.mapping("dim_customer").source("sqlite:///shop.db", table="customer")
"""

from mapperdsl.api import abandon, request_stop, resume, run
from mapperdsl.dsl.mapping import Mapping, mapping
from mapperdsl.errors import (
    CheckpointError,
    DeclarationError,
    ExecutionError,
    LeaseHeldError,
    MapperError,
    MergeError,
    NoSuchJobError,
    PlanError,
    TerminalError,
    TransientError,
    UnfinishedJobError,
)
from mapperdsl.plan.plan import Chunk, KeyRange, Plan, Window
from mapperdsl.preview import ChunkPreview, Preview
from mapperdsl.record.history import chunks, history, rejects
from mapperdsl.record.results import ChunkResult, JobResult

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "Chunk", "ChunkResult", "DeclarationError", "ExecutionError", "JobResult",
    "KeyRange", "LeaseHeldError", "MapperError", "Mapping", "MergeError", "NoSuchJobError", "Plan",
    "PlanError",
    "TerminalError", "TransientError", "UnfinishedJobError", "Window", "abandon", "mapping",
    "request_stop", "resume", "run", "Preview", "ChunkPreview", "history", "chunks", "rejects",
]
