"""Config loading: every implemented key, defaults, node inheritance, precedence, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from capacitor_trio.config import ConfigError, effective, load_settings
from capacitor_trio.config.load import GLOBAL_KEYS, env_name, node_to_yaml, parse_node
from capacitor_trio.config.models import Config, Node
from tests.helpers.nodes_yml import write_nodes


def write(d: Path, config: str = "", nodes: str = "[]\n") -> Path:
    (d / "config.yml").write_text(config)
    (d / "nodes.yml").write_text(nodes)
    return d


def test_defaults(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path), environ={})
    c = s.config
    assert c.my_ae_title == "CAPACITOR"
    assert c.scp_port == 1040
    assert c.ae_title_prefix == "DCP_"
    assert c.cache_path == tmp_path / "cache"
    assert (c.batch_size, c.process_delay, c.process_schedule) == (0, 0, ())
    assert (c.minimum_line_speed, c.stall_threshold_seconds, c.connect_timeout_seconds) == (500, 90, 30)
    assert (c.client_timeout, c.expiry_threshold, c.min_free_space, c.minimum_age) == (600, 604800, 10, 2)
    assert (c.storage_interval, c.reject_abstract_syntaxes, c.max_clients_per_server) == (250, (), 0)
    assert c.cycle_rejected_files_on_startup is True
    assert (c.api.enabled, c.api.port, c.api.token, c.api.service_password) == (False, 1080, "", "")
    assert (c.durable_writes, c.max_pdu_size) == (True, 1048576)
    assert (c.retry_delay_seconds, c.retry_max_delay_seconds, c.max_attempts, c.time_zone) == (30, 900, 0, "")
    assert not c.chaos.enabled
    assert s.nodes == () and s.warnings == ()


EVERY_KEY = """
myAeTitle: ROUTER1
scpPort: 11112
aeTitlePrefix: FWD_
cachePath: spool
batchSize: 25
processDelay: 1500
processDelayWindowMultiplier: 2.5
processSchedule: ["19:00 - 23:59", "00:00 - 06:00"]
minimumLineSpeed: 100
stallThresholdSeconds: 45
connectTimeoutSeconds: 5
clientTimeout: 120
expiryThreshold: 86400
minFreeSpace: 5
minimumAge: 0
storageInterval: 10
rejectAbstractSyntaxes: [1.2.840.10008.5.1.4.1.1.104.1]
maxClientsPerServer: 8
cycleRejectedFilesOnStartup: false
api:
  enabled: true
  port: 8081
  token: tok
  servicePassword: pw
durableWrites: false
deliveryProcess: false
maxPduSize: 65536
retryDelaySeconds: 10
retryMaxDelaySeconds: 600
maxAttempts: 5
filters: route, sort
dropUnfilteredInstances: false
timeZone: Europe/Berlin
defaultTransferSyntax: ""
chaos:
  killNodeActorsEverySeconds: 3
logSuffix: "#{8,50}"
suppressLogAeTitles: [PROBE]
suppressWebLog: true
"""


def test_every_implemented_key(tmp_path: Path) -> None:
    c = load_settings(write(tmp_path, EVERY_KEY), environ={}).config
    assert c.my_ae_title == "ROUTER1" and c.scp_port == 11112 and c.ae_title_prefix == "FWD_"
    assert c.cache_path == tmp_path / "spool"
    assert (c.batch_size, c.process_delay, c.process_delay_window_multiplier) == (25, 1500, 2.5)
    assert c.process_schedule == ("19:00 - 23:59", "00:00 - 06:00")
    assert (c.minimum_line_speed, c.stall_threshold_seconds, c.connect_timeout_seconds) == (100, 45, 5)
    assert (c.client_timeout, c.expiry_threshold, c.min_free_space, c.minimum_age) == (120, 86400, 5, 0)
    assert (c.storage_interval, c.max_clients_per_server) == (10, 8)
    assert c.reject_abstract_syntaxes == ("1.2.840.10008.5.1.4.1.1.104.1",)
    assert c.cycle_rejected_files_on_startup is False
    assert (c.api.enabled, c.api.port, c.api.token, c.api.service_password) == (True, 8081, "tok", "pw")
    assert c.api.auth_required
    assert (c.durable_writes, c.delivery_process, c.max_pdu_size) == (False, False, 65536)
    assert (c.retry_delay_seconds, c.retry_max_delay_seconds, c.max_attempts) == (10, 600, 5)
    assert c.time_zone == "Europe/Berlin"
    assert c.filters == ("route", "sort") and c.drop_unfiltered_instances is False
    assert c.chaos.enabled and c.chaos.kill_node_actors_every_seconds == 3
    assert (c.log_suffix, c.suppress_log_ae_titles, c.suppress_web_log) == ("#{8,50}", ("PROBE",), True)
    # every key in the table is exercised by EVERY_KEY
    for key in GLOBAL_KEYS:
        assert key.name.split(".")[-1] in EVERY_KEY, key.name


def test_absolute_cache_path_and_blank_values(tmp_path: Path) -> None:
    c = load_settings(write(tmp_path, f"cachePath: {tmp_path}/abs\nbatchSize:\napi:\n"), environ={}).config
    assert c.cache_path == tmp_path / "abs"
    assert c.batch_size == 0


def test_legacy_ae_title_alias(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, "aeTitle: OLDNAME\n"), environ={})
    assert s.config.my_ae_title == "OLDNAME"
    assert any("aeTitle" in w for w in s.warnings)


def test_unimplemented_and_unknown_keys_warn_once(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, "findScpPort: 1041\nworklistDays: 3\nfooBar: 1\nfilters:\n"), environ={})
    assert len(s.warnings) == 2
    assert "findScpPort, worklistDays" in s.warnings[0] and "not implemented" in s.warnings[0]
    assert "fooBar" in s.warnings[1] and "unknown" in s.warnings[1]


def test_unimplemented_keys_warn_alike_from_every_source(tmp_path: Path) -> None:
    """issue 19 #15: worklistDays warns in config.yml, in the environment and on the command line
    alike (it stopped start-up on the command line and was ignored silently in the environment),
    and each warning names its source."""
    d = write(tmp_path, "worklistDays: 3\n")
    s = load_settings(d, environ={"CAPACITOR_WORKLIST_DAYS": "3"}, overrides={"worklistDays": "3", "echoInterval": "5"})
    assert s.warnings == (
        f"{d / 'config.yml'}: keys accepted but not implemented yet (ignored): worklistDays",
        "environment: keys accepted but not implemented yet (ignored): CAPACITOR_WORKLIST_DAYS",
        "command line: keys accepted but not implemented yet (ignored): --config.echoInterval, --config.worklistDays",
    )
    write(tmp_path)
    r = run_cli("check-config", "--path", str(tmp_path), "--config.worklistDays=3", env={"CAPACITOR_ECHO_INTERVAL": "5"})
    assert r.returncode == 0, r.stderr
    assert "WARNING: command line: keys accepted but not implemented yet (ignored): --config.worklistDays" in r.stderr
    assert "WARNING: environment: keys accepted but not implemented yet (ignored): CAPACITOR_ECHO_INTERVAL" in r.stderr


# issue 19 #8: what the environment and the command line give is text, read by the key's type
PLAIN_STRINGS = ["#abc", "~", "null", "012345", "yes", "[a, b]", "a: b", "1e3", " padded ", "'quoted'"]


@pytest.mark.parametrize("secret", PLAIN_STRINGS)
def test_secrets_from_env_and_cli_are_the_exact_text(tmp_path: Path, secret: str) -> None:
    d = write(tmp_path)
    c = load_settings(d, environ={"CAPACITOR_API_TOKEN": secret}).config
    assert c.api.token == secret and c.api.auth_required
    c = load_settings(d, environ={}, overrides={"api.servicePassword": secret}).config
    assert c.api.service_password == secret and c.api.auth_required


def test_string_keys_from_env_and_cli_are_not_yaml(tmp_path: Path) -> None:
    d = write(tmp_path)
    env = {"CAPACITOR_MY_AE_TITLE": "012345", "CAPACITOR_AE_TITLE_PREFIX": "~", "CAPACITOR_TIME_ZONE": "UTC"}
    c = load_settings(d, environ=env, overrides={"cachePath": "null"}).config
    assert (c.my_ae_title, c.ae_title_prefix, c.time_zone, c.cache_path) == ("012345", "~", "UTC", d / "null")


def test_typed_keys_from_env_and_cli(tmp_path: Path) -> None:
    d = write(tmp_path)
    env = {
        "CAPACITOR_SCP_PORT": "012345", "CAPACITOR_DURABLE_WRITES": "False", "CAPACITOR_API_ENABLED": "yes",
        "CAPACITOR_PROCESS_DELAY_WINDOW_MULTIPLIER": "2.5", "CAPACITOR_PROCESS_SCHEDULE": "['19:00 - 23:59', 00:00 - 06:00]",
    }
    c = load_settings(d, environ=env, overrides={"batchSize": " 7 "}).config
    assert (c.scp_port, c.durable_writes, c.api.enabled, c.batch_size) == (12345, False, True, 7)
    assert c.process_delay_window_multiplier == 2.5
    assert c.process_schedule == ("19:00 - 23:59", "00:00 - 06:00")
    c = load_settings(d, environ={"CAPACITOR_BATCH_SIZE": "", "CAPACITOR_API_TOKEN": ""}).config
    assert c.batch_size == 0 and c.api.token == ""  # blank keeps the default
    for env_name_, raw, why in (
        ("CAPACITOR_SCP_PORT", "0x10", "whole number"),
        ("CAPACITOR_DURABLE_WRITES", "1", "true or false"),
        ("CAPACITOR_PROCESS_DELAY_WINDOW_MULTIPLIER", "nan", "number"),
    ):
        with pytest.raises(ConfigError, match=why) as info:
            load_settings(d, environ={env_name_: raw})
        assert f"environment {env_name_}" in str(info.value) and repr(raw) in str(info.value)


def test_numbers_in_yaml_files_are_read_as_written(tmp_path: Path) -> None:
    """A string key written as a YAML number keeps the text (`012345` is not octal 5349, which
    would misroute an AE title or change a secret), and a whole number with a leading zero is
    decimal, as from the environment."""
    config = "myAeTitle: 012345\napi:\n  token: 0777\n  servicePassword: 1e3\nbatchSize: 010\naeTitlePrefix: 0_\n"
    nodes = "- AeTitle: 0123\n  Aliases: [00042, 1_0]\n  Port: 0104\n"
    s = load_settings(write(tmp_path, config, nodes), environ={})
    c = s.config
    assert (c.my_ae_title, c.api.token, c.api.service_password, c.batch_size) == ("012345", "0777", "1e3", 10)
    assert type(c.batch_size) is int and c.ae_title_prefix == "0_"
    (node,) = s.nodes
    assert (node.ae_title, node.aliases, node.port) == ("0123", ("00042", "1_0"), 104)
    assert type(node.port) is int
    write_nodes(tmp_path / "nodes.yml", s.nodes)
    assert load_settings(tmp_path, environ={}).nodes == s.nodes  # written back quoted
    with pytest.raises(ConfigError, match=r"nodes\.yml: node 0123: Port = 070000: must be 1\.\.65535"):
        load_settings(write(tmp_path, "", "- AeTitle: 0123\n  Port: 070000\n"), environ={})
    with pytest.raises(ConfigError, match="finite"):
        load_settings(write(tmp_path, "processDelayWindowMultiplier: .nan\n"), environ={})


def test_open_writes_warn_once_at_start(tmp_path: Path) -> None:
    """No credential: writes are open, as the contract says, and one warning says so."""
    s = load_settings(write(tmp_path, "api:\n  enabled: true\n"), environ={})
    assert len(s.warnings) == 1 and "write endpoints are open" in s.warnings[0]
    s = load_settings(tmp_path, environ={"CAPACITOR_API_TOKEN": "#abc"})
    assert s.warnings == ()
    assert load_settings(write(tmp_path, "api:\n  enabled: false\n"), environ={}).warnings == ()
    write(tmp_path, "api:\n  enabled: true\n")
    r = run_cli("check-config", "--path", str(tmp_path), env={"CAPACITOR_API_TOKEN": "~"})
    assert r.returncode == 0 and "write endpoints are open" not in r.stderr, r.stderr
    r = run_cli("check-config", "--path", str(tmp_path))
    assert r.returncode == 0 and r.stderr.count("WARNING") == 1 and "write endpoints are open" in r.stderr


NODES = """
- AeTitle: PACS
  HostName: pacs.example
  Port: 11112
  NodeRole: Storage
  Aliases: [ARCHIVE, LONGTERM]
  Priority: 1
  ProcessDelay: 2000
  Impersonate: true
  BatchSize:
  MinimumLineSpeed: 0
  StallThreshold: 30
  ProcessSchedule: ["22:00 - 06:00"]
  SopClassPriorities: [1.2.840.10008.5.1.4.1.1.1, default, 1.2.840.10008.5.1.4.1.1.7]
- AeTitle: PACS
  Role: QueryRetrieve
  HostName: pacs.example
  Port: 11112
- AeTitle: 12345
"""


def test_nodes_and_inheritance(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, "batchSize: 7\nprocessSchedule: ['08:00 - 17:00']\n", NODES), environ={})
    pacs, qr, numeric = s.nodes
    assert pacs.ae_title == "PACS" and pacs.host_name == "pacs.example" and pacs.port == 11112
    assert pacs.aliases == ("ARCHIVE", "LONGTERM") and pacs.priority == 1 and pacs.impersonate
    assert pacs.sop_class_priorities == ("1.2.840.10008.5.1.4.1.1.1", "default", "1.2.840.10008.5.1.4.1.1.7")
    eff = effective(pacs, s.config)
    assert eff.batch_size == 7  # blank: inherited
    assert eff.minimum_line_speed == 0  # explicit 0 overrides (disables)
    assert eff.stall_threshold == 30 and eff.process_delay_ms == 2000
    assert eff.process_schedule == ("22:00 - 06:00",)
    assert qr.role == "QueryRetrieve"
    assert numeric == Node(ae_title="12345")  # defaults: 127.0.0.1:104 Storage
    eff = effective(numeric, s.config)
    assert eff.process_schedule == ("08:00 - 17:00",) and eff.stall_threshold == 90
    assert s.storage_nodes() == (pacs, numeric)


def test_transfer_syntax_is_in_force_without_a_warning(tmp_path: Path) -> None:
    """issue 22: the node's TransferSyntax, else defaultTransferSyntax, is the UID its prepared
    copies are in (a name or a UID of the table); blank everywhere keeps the received syntax.
    Neither key warns any more."""
    nodes = (
        "- AeTitle: J2K\n  TransferSyntax: JPEG2000Lossless\n"
        "- AeTitle: BYUID\n  TransferSyntax: 1.2.840.10008.1.2\n"
        "- AeTitle: INHERIT\n  TransferSyntax: ''\n"
    )
    s = load_settings(write(tmp_path, "defaultTransferSyntax: RLELossless\n", nodes), environ={})
    assert s.warnings == ()
    j2k, by_uid, inherit = (effective(n, s.config).transfer_syntax for n in s.nodes)
    assert (j2k, by_uid, inherit) == ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2", "1.2.840.10008.1.2.5")
    s = load_settings(write(tmp_path, "", nodes), environ={})
    assert effective(s.nodes[2], s.config).transfer_syntax == ""  # keep the received syntax
    assert effective(s.nodes[0], s.config).transfer_syntax == "1.2.840.10008.1.2.4.90"
    assert node_to_yaml(s.nodes[0])["TransferSyntax"] == "JPEG2000Lossless"  # written as given


def test_precedence_cli_over_env_over_file(tmp_path: Path) -> None:
    d = write(tmp_path, "scpPort: 2000\napi:\n  port: 3000\nmyAeTitle: FILE\n")
    env = {"CAPACITOR_SCP_PORT": "2001", "CAPACITOR_API_PORT": "3001"}
    c = load_settings(d, environ=env, overrides={"scpPort": "2002"}).config
    assert c.scp_port == 2002  # command line wins
    assert c.api.port == 3001  # environment beats the file
    assert c.my_ae_title == "FILE"
    c = load_settings(d, environ={"CAPACITOR_REJECT_ABSTRACT_SYNTAXES": "1.2.3, 1.2.4"}).config
    assert c.reject_abstract_syntaxes == ("1.2.3", "1.2.4")
    c = load_settings(d, environ={}, overrides={"api.enabled": "true", "processSchedule": "[]"}).config
    assert c.api.enabled and c.process_schedule == ()


def test_env_names() -> None:
    assert env_name("myAeTitle") == "MY_AE_TITLE"
    assert env_name("api.port") == "API_PORT"
    assert env_name("redactedCFindLogging") == "REDACTED_C_FIND_LOGGING"
    assert env_name("chaos.killNodeActorsEverySeconds") == "CHAOS_KILL_NODE_ACTORS_EVERY_SECONDS"


def test_write_nodes_round_trip(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, "", NODES), environ={})
    write_nodes(tmp_path / "nodes.yml", s.nodes)
    again = load_settings(tmp_path, environ={})
    assert again.nodes == s.nodes
    assert "BatchSize" not in node_to_yaml(s.nodes[0])  # blank stays blank


def test_parse_node_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="Port = 0"):
        parse_node({"AeTitle": "X", "Port": 0}, "api", 0)


def test_config_defaults_match_dataclass(tmp_path: Path) -> None:
    c = load_settings(write(tmp_path), environ={}).config
    assert c == Config(data_dir=tmp_path, cache_path=tmp_path / "cache")


# ---- bad input: one clear line, exit code 2, no traceback (run as a subprocess) ----

BAD = [
    ("scpPort: [1\n", "[]", "config.yml: line", "invalid YAML"),
    ("scpPort: abc\n", "[]", "config.yml: scpPort = 'abc'", "whole number"),
    ("scpPort: 70000\n", "[]", "config.yml: scpPort = 70000", "0..65535"),
    ("api:\n  port: 0\n", "[]", "config.yml: api.port = 0", "1..65535"),
    ("myAeTitle: WAY_TOO_LONG_AE_TITLE\n", "[]", "myAeTitle", "at most 16"),
    ("myAeTitle: 'A\\\\B'\n", "[]", "myAeTitle", "backslashes"),
    ("durableWrites: yes please\n", "[]", "durableWrites", "true or false"),
    ("processSchedule: ['25:00 - 26:00']\n", "[]", "processSchedule", "25:00"),
    ("timeZone: Mars/Olympus\n", "[]", "timeZone", "time zone"),
    ("", "- AeTitle: PACS\n  Port: 99999\n", "nodes.yml: node PACS: Port = 99999", "1..65535"),
    ("", "- AeTitle: PACS\n  NodeRole: Printer\n", "nodes.yml: node PACS: NodeRole = 'Printer'", "must be one of"),
    ("", "- AeTitle: THIS_IS_SEVENTEEN\n", "nodes.yml: node 1: AeTitle", "at most 16"),
    ("", "- AeTitle: PACS\n  ProcessSchedule: ['9 to 5']\n", "ProcessSchedule", "9 to 5"),
    ("", "- AeTitle: PACS\n- AeTitle: PACS\n", "nodes.yml: node PACS: AeTitle = 'PACS'", "duplicate"),
    ("", "- AeTitle: A\n- AeTitle: B\n  Aliases: [A]\n", "node B: Aliases = 'A'",
     "called AE A (its alias A) already names Storage node A (its AeTitle)"),
    # issue 19 #18: every called AE (titles, aliases, prefixed titles) names one Storage node,
    # and the error names both nodes and what each answers to
    ("", "- AeTitle: A\n  Aliases: [B]\n- AeTitle: B\n", "node B: AeTitle = 'B'",
     "called AE B (its AeTitle) already names Storage node A (its alias B)"),
    ("", "- AeTitle: STORESCP\n  Aliases: [DCP_ORTHANC]\n- AeTitle: ORTHANC\n", "node ORTHANC: AeTitle = 'ORTHANC'",
     "called AE DCP_ORTHANC (aeTitlePrefix + its AeTitle) already names Storage node STORESCP (its alias DCP_ORTHANC)"),
    ("", "- AeTitle: ORTHANC\n- AeTitle: STORESCP\n  Aliases: [DCP_ORTHANC]\n", "node STORESCP: Aliases = 'DCP_ORTHANC'",
     "called AE DCP_ORTHANC (its alias DCP_ORTHANC) already names Storage node ORTHANC (aeTitlePrefix + its AeTitle)"),
    ("", "- AeTitle: X\n- AeTitle: DCP_X\n", "node DCP_X: AeTitle = 'DCP_X'",
     "called AE DCP_X (its AeTitle) already names Storage node X (aeTitlePrefix + its AeTitle)"),
    ("aeTitlePrefix: FWD_\n", "- AeTitle: X\n  Aliases: [Y]\n- AeTitle: FWD_Y\n", "node FWD_Y: AeTitle = 'FWD_Y'",
     "already names Storage node X (aeTitlePrefix + its alias Y)"),
    # issue 19 #19: what no peer can be reached at or called as
    ("", "- AeTitle: PACS\n  HostName: ''\n", "nodes.yml: node PACS: HostName = ''", "cannot be empty"),
    ("", "- AeTitle: PACS\n  HostName:\n", "nodes.yml: node PACS: HostName = None", "cannot be empty"),
    ("", "- AeTitle: PACS\n  HostName: '  '\n", "nodes.yml: node PACS: HostName", "cannot be empty"),
    ("", '- AeTitle: PACS\n  HostName: "pacs\\nevil"\n', "nodes.yml: node PACS: HostName", "control characters"),
    ("", "- AeTitle: PACS\n  Port: 0\n", "nodes.yml: node PACS: Port = 0", "1..65535"),
    ("", "- AeTitle: PACS\n  Port: 65536\n", "nodes.yml: node PACS: Port = 65536", "1..65535"),
    ("", "- AeTitle: PACS\n  Aliases: [SEVENTEEN_CHARS_X]\n", "node PACS: Aliases", "at most 16"),
    ("", "- AeTitle: PACS\n  Aliases: ['A\\B']\n", "node PACS: Aliases", "backslashes or control"),
    ("", '- AeTitle: "PACS\\t"\n', "nodes.yml: node 1: AeTitle = 'PACS\\t'", "control characters"),
    ("", '- AeTitle: "PA\\x01CS"\n', "nodes.yml: node 1: AeTitle", "control characters"),
    ("myAeTitle: \"ROUTER\\n\"\n", "[]", "myAeTitle = 'ROUTER\\n'", "control characters"),
    ("aeTitlePrefix: SIXTEEN_CHARS_XX\n", "[]", "aeTitlePrefix = 'SIXTEEN_CHARS_XX'", "at most 16"),
    ("aeTitlePrefix: 'A\\B_'\n", "[]", "aeTitlePrefix", "backslashes or control"),
    # issue 19 #9: a secret's value is never echoed (redacted as check-config does)
    ("api:\n  servicePassword: [hunter2-secret]\n", "[]", "api.servicePassword = <redacted>", "must be a string"),
    ("api:\n  token: {a: hunter2-secret}\n", "[]", "api.token = <redacted>", "must be a string"),
    # issue 21: a filter capacitor-trio does not run yet stops start-up (it would send unfiltered)
    ("filters: route, lua, mutate\n", "[]", "config.yml: filters = 'route, lua, mutate'", "the lua filter is not supported yet"),
    ("filters: [sort, siemens_cto_converter]\n", "[]", "filters = ['sort', 'siemens_cto_converter']", "the siemens_cto_converter filter is not supported yet"),
    ("filters: route, rout\n", "[]", "filters = 'route, rout'", "'rout' is not a filter"),
    ("filters: sort, sort\n", "[]", "filters = 'sort, sort'", "sort is named twice"),
    ("dropUnfilteredInstances: true\n", "[]", "config.yml: dropUnfilteredInstances = True", "would drop every instance"),
    ("", "- HostName: x\n", "nodes.yml: node 1: AeTitle", "required"),
    # issue 22: an unknown syntax name stays a one-line error naming the known ones
    ("defaultTransferSyntax: JPEG2001\n", "[]", "config.yml: defaultTransferSyntax = 'JPEG2001'",
     "unknown transfer syntax; use one of ImplicitVRLittleEndian"),
    ("", "- AeTitle: PACS\n  TransferSyntax: Deflate\n", "nodes.yml: node PACS: TransferSyntax = 'Deflate'",
     "unknown transfer syntax"),
    ("", "PACS: 1\n", "nodes.yml: file", "list"),
]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "capacitor_trio", *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(("config", "nodes", "where", "why"), BAD)
def test_bad_config_one_line_exit_2(tmp_path: Path, config: str, nodes: str, where: str, why: str) -> None:
    write(tmp_path, config, nodes)
    r = run_cli("check-config", "--path", str(tmp_path))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert where in lines[0] and why in lines[0], lines[0]
    assert "hunter2" not in r.stderr


def test_filters_from_env_or_cli(tmp_path: Path) -> None:
    """issue 21: `filters` is read from every source like any key; an unsupported filter stops
    start-up naming its source."""
    write(tmp_path)
    r = run_cli("check-config", "--path", str(tmp_path), env={"CAPACITOR_FILTERS": "route, lua"})
    assert r.returncode == 2 and "environment CAPACITOR_FILTERS: filters = ['route', 'lua']: the lua filter" in r.stderr
    r = run_cli("check-config", "--path", str(tmp_path), "--config.filters=mutate,hologic_sco_converter")
    assert r.returncode == 2 and "command line --config.filters" in r.stderr and "hologic_sco_converter filter is not supported" in r.stderr
    r = run_cli("check-config", "--path", str(tmp_path), "--config.filters=")  # blank: no filter
    assert r.returncode == 0, r.stderr
    s = load_settings(tmp_path, environ={"CAPACITOR_FILTERS": "sort, route"})
    assert s.config.filters == ("sort", "route")


def test_called_ae_check_follows_ae_title_prefix(tmp_path: Path) -> None:
    nodes = "- AeTitle: X\n- AeTitle: DCP_X\n"
    s = load_settings(write(tmp_path, "aeTitlePrefix: ''\n", nodes), environ={})
    assert [n.ae_title for n in s.nodes] == ["X", "DCP_X"]
    with pytest.raises(ConfigError, match="already names Storage node X"):
        load_settings(tmp_path, environ={"CAPACITOR_AE_TITLE_PREFIX": "DCP_"})
    # only Storage nodes are called; a node's own names may overlap
    ok = "- AeTitle: X\n  Aliases: [DCP_X, X]\n- AeTitle: DCP_X\n  NodeRole: QueryRetrieve\n"
    assert len(load_settings(write(tmp_path, "", ok), environ={}).nodes) == 2


def test_bad_env_and_cli_values_name_their_source(tmp_path: Path) -> None:
    write(tmp_path)
    r = run_cli("check-config", "--path", str(tmp_path), env={"CAPACITOR_API_PORT": "x"})
    assert r.returncode == 2 and "environment CAPACITOR_API_PORT: api.port = 'x'" in r.stderr
    r = run_cli("check-config", "--path", str(tmp_path), "--config.scpPort=-1")
    assert r.returncode == 2 and "command line --config.scpPort: scpPort = -1" in r.stderr
    r = run_cli("check-config", "--path", str(tmp_path), "--config.noSuchKey=1")
    assert r.returncode == 2 and "unknown configuration key" in r.stderr
    r = run_cli("check-config", "--path", str(tmp_path), "--config.api.tokn=hunter2")  # a typo'd secret
    assert r.returncode == 2 and "--config.api.tokn: unknown configuration key" in r.stderr
    assert "hunter2" not in r.stderr


def test_missing_files(tmp_path: Path) -> None:
    r = run_cli("check-config", "--path", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "config.yml: file: not found" in r.stderr


def test_check_config_prints_effective_settings_redacted(tmp_path: Path) -> None:
    write(tmp_path, "api:\n  token: s3cret\n  servicePassword: hunter2\n", "- AeTitle: PACS\n")
    r = run_cli("check-config", "--path", str(tmp_path), "--config.scpPort=2222")
    assert r.returncode == 0, r.stderr
    assert "s3cret" not in r.stdout and "hunter2" not in r.stdout and "<redacted>" in r.stdout
    assert '"scpPort": 2222' in r.stdout and '"AeTitle": "PACS"' in r.stdout


def test_version() -> None:
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("capacitor-trio ")
