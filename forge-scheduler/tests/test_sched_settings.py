"""Cron settings are validated at start-up, and errors name the cron."""

import pytest

from forge_kernel import cron
from forge_kernel.app import Registry
from forge_kernel.errors import StartupError
from forge_scheduler.settings import CronSettings, crons_of


def defn(schedule="* * * * *", **settings):
    async def my_cron(ctx) -> None:
        pass

    return cron(schedule, **settings)(my_cron).__forge__


def test_defaults():
    s = CronSettings.from_definition(defn())
    assert (s.catch_up, s.overlap, s.grace) == (0, "allow", 30.0)
    assert s.schedule.timezone == "UTC"


def test_policies_are_read():
    s = CronSettings.from_definition(defn("0 9 * * *", timezone="Europe/Berlin", catch_up=4, overlap="skip", grace=2,
                                          max_attempts=2, queue="crons"))
    assert (s.catch_up, s.overlap, s.grace, s.schedule.timezone) == (4, "skip", 2.0, "Europe/Berlin")
    assert CronSettings.from_definition(defn(catch_up="skip")).catch_up == 0


@pytest.mark.parametrize("settings, needle", [
    ({"catch_up": -1}, "catch_up"),
    ({"catch_up": "all"}, "catch_up"),
    ({"catch_up": True}, "catch_up"),
    ({"overlap": "queue"}, "overlap"),
    ({"grace": -1}, "grace"),
    ({"grace": "soon"}, "grace"),
    ({"overlap_timeout": 0}, "overlap_timeout"),
    ({"retries": 3}, "unknown setting(s) retries"),
    ({"timezone": "Nowhere/Land"}, "unknown time zone 'Nowhere/Land'"),
])
def test_bad_settings_name_the_cron_and_the_problem(settings, needle):
    with pytest.raises(StartupError) as err:
        CronSettings.from_definition(defn(**settings))
    assert "cron 'my_cron'" in str(err.value) and needle in str(err.value)


def test_bad_expression_names_the_cron():
    with pytest.raises(StartupError, match=r"cron 'my_cron' .*invalid cron expression '61 \* \* \* \*'"):
        CronSettings.from_definition(defn("61 * * * *"))


def test_a_cron_with_required_arguments_is_refused():
    async def needs_arg(ctx, user: str) -> None:
        pass

    d = cron("* * * * *")(needs_arg).__forge__
    with pytest.raises(StartupError, match="cron 'needs_arg'.*requires user"):
        CronSettings.from_definition(d)


def test_crons_of_reads_only_crons():
    reg = Registry.from_modules(["sched_app"])
    assert sorted(crons_of(reg)) == ["every_second", "morning"]


@pytest.mark.parametrize("module, needle", [
    ("sched_bad_expr", "cron 'broken_minutes'"),
    ("sched_bad_tz", "cron 'lost_city'"),
])
async def test_node_start_fails_naming_the_cron(sched_node, module, needle):
    with pytest.raises(StartupError) as err:
        await sched_node(modules=[module])
    assert needle in str(err.value)


async def test_crons_without_a_job_store_are_a_startup_error(forge_node):
    from sched_helpers import FAST

    with pytest.raises(StartupError, match="no job store"):
        await forge_node(modules=["sched_app"], config={"node": {"roles": ["scheduler"]}, "scheduler": FAST},
                         env={"FORGE_DISABLE_PLUGIN_AUTOLOAD": "1", "FORGE_PLUGINS": "forge_scheduler.hooks"})


async def test_bad_scheduler_config_names_the_key(forge_node):
    from forge_kernel.errors import ConfigError

    with pytest.raises(ConfigError, match=r"\[scheduler\] election_interval"):
        await forge_node(modules=[], config={"scheduler": {"election_interval": 0}},
                         env={"FORGE_DISABLE_PLUGIN_AUTOLOAD": "1", "FORGE_PLUGINS": "forge_scheduler.hooks"})
