"""FORGE worker role: a PostgreSQL job queue.

Public API: :class:`JobQueue` (enqueue and manage jobs with only a pool), :class:`Dispatcher`
(behind ``ctx.dispatch``), :class:`JobContext` (a job's ``ctx``), :class:`RetryLater`,
:class:`JobCancelled`, :class:`WorkerConfig` (the ``[worker]`` section).
"""

from .config import WorkerConfig
from .context import JobCancelled, JobContext, RetryLater, RunningJob
from .queue import Dispatcher, JobInfo, JobQueue, enqueue, store_jobs

__all__ = ["Dispatcher", "JobCancelled", "JobContext", "JobInfo", "JobQueue", "RetryLater", "RunningJob",
           "WorkerConfig", "enqueue", "store_jobs"]
