"""Configuration: forge.toml + FORGE_<SECTION>__<KEY>, strict types, errors that name the key."""

import subprocess
import sys

import attrs
import pytest

from forge_kernel.config import KERNEL_SECTIONS, in_range, load_config
from forge_kernel.errors import ConfigError


@attrs.frozen
class PluginSection:
    port: int = attrs.field(default=8080, validator=in_range(1, 65535))
    hosts: list[str] = attrs.field(factory=list)
    ratio: float = 0.5
    enabled: bool = True


SECTIONS = {**KERNEL_SECTIONS, "plugin": PluginSection}


def load(data=None, env=None, **kw):
    return load_config(SECTIONS, data=data or {}, env=env or {}, **kw)


def test_defaults_give_a_working_config():
    cfg = load()
    assert cfg["plugin"] == PluginSection()
    assert cfg.database.url == ""
    assert cfg.node.roles == []


def test_toml_file_and_env_override(tmp_path):
    path = tmp_path / "forge.toml"
    path.write_text('[plugin]\nport = 9000\nhosts = ["a"]\n[node]\nroles = ["worker"]\n')
    cfg = load_config(SECTIONS, path=path, env={"FORGE_PLUGIN__PORT": "9100", "FORGE_PLUGIN__ENABLED": "false",
                                                "FORGE_NODE__CAPABILITIES": "gpu,email"})
    assert cfg["plugin"].port == 9100
    assert cfg["plugin"].hosts == ["a"]
    assert cfg["plugin"].enabled is False
    assert cfg.node.roles == ["worker"]
    assert cfg.node.capabilities == ["gpu", "email"]


@pytest.mark.parametrize("raw", ["50000,10,10", "[50000, 10, 10]"])
def test_env_list_of_numbers_with_or_without_brackets(raw):
    assert load(env={"FORGE_NODE__GC_THRESHOLDS": raw}).node.gc_thresholds == [50000, 10, 10]


def test_env_string_keys_stay_strings():
    cfg = load(env={"FORGE_DATABASE__URL": "postgresql://x@h:1/db", "FORGE_NODE__ID": "123"})
    assert cfg.database.url == "postgresql://x@h:1/db"
    assert cfg.node.id == "123"


@pytest.mark.parametrize("data, key, expect", [
    ({"plugin": {"prot": 1}}, "[plugin] prot", "unknown key"),
    ({"plugn": {}}, "[plugn]", "unknown section"),
])
def test_unknown_keys_and_sections(data, key, expect):
    with pytest.raises(ConfigError) as ei:
        load(data)
    assert key in str(ei.value) and expect in str(ei.value)


@pytest.mark.parametrize("data, key, expect", [
    ({"plugin": {"port": "80"}}, "[plugin] port = '80'", "expected int, got str '80'"),
    ({"plugin": {"port": 80.5}}, "[plugin] port = 80.5", "expected int"),
    ({"plugin": {"enabled": 1}}, "[plugin] enabled = 1", "expected bool"),
    ({"plugin": {"hosts": "a"}}, "[plugin] hosts", "expected"),
    ({"plugin": {"hosts": ["a", 2]}}, "[plugin] hosts[1]", "expected str, got int 2"),
    ({"node": "worker"}, "[node]", "expected a table"),
])
def test_wrong_types_name_key_value_and_expectation(data, key, expect):
    with pytest.raises(ConfigError) as ei:
        load(data)
    msg = str(ei.value)
    assert key in msg and expect in msg, msg


@pytest.mark.parametrize("data, env, key, expect", [
    ({"plugin": {"port": 0}}, {}, "[plugin] port = 0", "between 1 and 65535"),
    ({}, {"FORGE_PLUGIN__PORT": "70000"}, "[plugin] port = 70000", "between 1 and 65535"),
    ({"log": {"level": "LOUD"}}, {}, "[log] level = 'LOUD'", "one of TRACE"),
    ({"node": {"roles": ["a b"]}}, {}, "[node] roles", "names of letters"),
    ({"database": {"pool_min": 9, "pool_max": 2}}, {}, "pool_min", "at most pool_max (2)"),
    ({"node": {"heartbeat_interval": -1}}, {}, "[node] heartbeat_interval = -1", "between 0.05 and 300"),
    ({"node": {"gc_thresholds": [700, 10]}}, {}, "[node] gc_thresholds = [700, 10]", "three whole numbers from 0"),
    ({"node": {"gc_thresholds": [700, -1, 10]}}, {}, "[node] gc_thresholds", "three whole numbers from 0"),
    ({}, {"FORGE_NODE__GC_THRESHOLDS": "10000000000000000000,1,1"}, "[node] gc_thresholds", "to 2147483647"),
])
def test_bad_values_name_key_value_and_expectation(data, env, key, expect):
    with pytest.raises(ConfigError) as ei:
        load(data, env)
    msg = str(ei.value)
    assert key in msg and expect in msg, msg


@pytest.mark.parametrize("database, key, expect", [
    ({"read_url": "postgresql://u:hunter2@replica/db"}, "read_url", "nothing while [database] url is empty"),
    ({"direct_url": "postgresql://u@db/x"}, "direct_url", "nothing while [database] url is empty"),
    ({"pooler": "transaction"}, "pooler", "'none' or 'auto' while [database] url is empty"),
    ({"url": "postgresql://u:hunter2@bouncer/db", "pooler": "transaction"}, "direct_url", "the server itself"),
    ({"url": "postgresql://u:hunter2@bouncer/db", "pooler": "session"}, "pooler", "one of auto, none, transaction"),
])
def test_database_urls_and_pooler_are_checked_without_showing_passwords(database, key, expect):
    with pytest.raises(ConfigError) as info:
        load({"database": database})
    assert f"[database] {key}" in str(info.value) and expect in str(info.value)
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("database, pooled, session", [
    ({"url": "postgresql://a/db"}, False, "postgresql://a/db"),
    ({"url": "postgresql://bouncer/db", "direct_url": "postgresql://a/db"}, True, "postgresql://a/db"),
    ({"url": "postgresql://b/db", "direct_url": "postgresql://a/db", "pooler": "none"}, False, "postgresql://a/db"),
    ({"url": "postgresql://a/db", "direct_url": "postgresql://a/db"}, False, "postgresql://a/db"),
])
def test_pooler_auto_means_transaction_when_direct_url_differs(database, pooled, session):
    cfg = load({"database": database})
    assert cfg.database.transaction_pooler is pooled and cfg.database.session_url == session


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as ei:
        load({"plugin": {"port": "x", "extra": 1}, "log": {"level": "NOPE"}})
    msg = str(ei.value)
    assert "extra" in msg and "port" in msg and "NOPE" in msg


def test_invalid_toml_and_missing_file(tmp_path):
    bad = tmp_path / "forge.toml"
    bad.write_text("[node\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(SECTIONS, path=bad, env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(SECTIONS, path=tmp_path / "nope.toml", env={})


def test_cli_reports_config_error_without_traceback(tmp_path):
    (tmp_path / "forge.toml").write_text("[node]\nheartbeat_interval = \"fast\"\n")
    proc = subprocess.run([sys.executable, "-m", "forge_kernel.cli", "start"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "[node] heartbeat_interval = 'fast': expected float" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("value", [80, 70000, -1])
def test_embedded_port_is_zero_or_an_unprivileged_tcp_port(value):
    with pytest.raises(ConfigError) as ei:
        load({"database": {"embedded_port": value}})
    msg = str(ei.value)
    assert f"[database] embedded_port = {value}" in msg and "0 (unix socket only) or a TCP port from 1024 to 65535" in msg
    assert load({"database": {"embedded_port": 5433}}).database.embedded_port == 5433
    assert load().database.embedded_port == 0
