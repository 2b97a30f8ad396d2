"""Durable workflows: the runtime (runs claimed like jobs, steps checkpointed in one fenced
statement each, deterministic replay, compensation stored as data, events as a mailbox), the
context workflow functions get, the Python API and the CLI."""

from .api import RunInfo, StepInfo, WorkflowClient
from .context import ChildFailed, ChildRun, Event, StepFailed, WorkflowContext
from .store import WorkflowEngine

__all__ = ["ChildFailed", "ChildRun", "Event", "RunInfo", "StepFailed", "StepInfo", "WorkflowClient",
           "WorkflowContext", "WorkflowEngine"]
