"""FORGE worker role: a PostgreSQL job queue.

Public API: :class:`JobQueue` (enqueue and manage jobs with only a pool), :class:`Dispatcher`
(behind ``ctx.dispatch``), :class:`JobContext` (a job's ``ctx``), :class:`RetryLater`,
:class:`JobCancelled`, :class:`WorkerConfig` (the ``[worker]`` section).
"""

from .config import WorkerConfig, WorkflowConfig
from .context import JobCancelled, JobContext, RetryLater, RunningJob
from .queue import Dispatcher, JobInfo, JobQueue, enqueue, store_jobs
from .workflows import (ChildFailed, ChildRun, Event, RunInfo, StepFailed, StepInfo, WorkflowClient, WorkflowContext,
                        WorkflowEngine)

__all__ = ["Dispatcher", "JobCancelled", "JobContext", "JobInfo", "JobQueue", "RetryLater", "RunningJob",
           "WorkerConfig", "enqueue", "store_jobs", "ChildFailed", "ChildRun", "Event", "RunInfo", "StepFailed",
           "StepInfo", "WorkflowClient", "WorkflowConfig", "WorkflowContext", "WorkflowEngine"]
