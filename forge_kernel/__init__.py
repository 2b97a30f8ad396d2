"""FORGE kernel: config, database, hooks, plugin loading, migrations, node lifecycle, app API."""

from .app import FunctionDef, RateLimit, Registry, action, cron, field, job, model, mutation, query, workflow
from .errors import ForgeError, StartupError
from .executor import ANONYMOUS, SYSTEM, ActionContext, Auth, Context, FunctionExecutor, JobOutcome, JobRequest, MutationContext, QueryContext, WorkflowRequest, job_request, workflow_request
from .hookspecs import hookimpl
from .services import MaintenanceTask, Service

__all__ = [
    "ANONYMOUS", "SYSTEM", "ActionContext", "Auth", "Context", "ForgeError", "FunctionDef", "FunctionExecutor",
    "JobOutcome", "JobRequest", "MaintenanceTask", "MutationContext", "QueryContext", "RateLimit", "Registry", "Service",
    "StartupError", "action", "cron", "field", "hookimpl", "job", "job_request", "model", "mutation", "query", "workflow", "WorkflowRequest", "workflow_request",
]
