"""forge-scheduler: leader election, exactly-once crons and cluster maintenance (role ``scheduler``)."""

from .api import CronInfo, Crons, RunInfo, history, leader, list_crons, pause, resume, trigger
from .election import Leadership, LeaderElection, NotLeader
from .schedule import CronExpressionError, CronSchedule
from .service import Scheduler, scheduler_of
from .settings import CronSettings, SchedulerConfig, crons_of

__all__ = [
    "CronExpressionError", "CronInfo", "CronSchedule", "CronSettings", "Crons", "LeaderElection", "Leadership",
    "NotLeader", "RunInfo", "Scheduler", "SchedulerConfig", "crons_of", "history", "leader", "list_crons",
    "pause", "resume", "scheduler_of", "trigger",
]
