"""Helpers shared by the scheduler tests (a unique module name: every package's tests share sys.path)."""

from forge_kernel.testing import eventually  # noqa: F401  (re-exported for the tests)

#: in-process nodes load only the scheduler and the test job store, whatever else is installed
ISOLATED = {"FORGE_DISABLE_PLUGIN_AUTOLOAD": "1", "FORGE_PLUGINS": "forge_scheduler.hooks,sched_fake_store"}
FAST = {"election_interval": 0.1, "renew_interval": 0.2, "tick_interval": 0.1, "check_timeout": 10.0}
