"""Reading config.yml and nodes.yml: the one place that knows Capacitor's spellings.

Precedence for global keys: `--config.<key>=<value>` on the command line > environment variable
`CAPACITOR_<UPPER_SNAKE_KEY>` > config.yml > defaults. config.yml is YAML; a value from the
command line or the environment is plain text read by the key's declared type (a string stays the
exact string given). Any error raises `ConfigError`, whose text is one line naming the file, the
key and the value (secrets redacted).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import typing
import zoneinfo
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import yaml

from capacitor_trio.config.models import (
    DEFAULT_PREFIX,
    NODE_ROLES,
    TRANSFER_SYNTAX_NAMES,
    ApiConfig,
    ChaosConfig,
    Config,
    Node,
    Settings,
    called_aes,
)
from capacitor_trio.domain.schedule import ScheduleError, parse_schedule


class ConfigError(Exception):
    """A configuration problem; str() is the one line shown to the operator (a secret's value
    never appears in it: `shown_value` redacts it, as check-config does)."""

    def __init__(self, source: str, key: str, value: object, reason: str) -> None:
        self.source, self.key, self.value, self.reason = source, key, value, reason
        shown = "" if value is _MISSING else f" = {_show(shown_value(key, value))}"
        super().__init__(f"{source}: {key}{shown}: {reason}")


_MISSING = object()

#: Keys whose values are never shown: not in errors, not by check-config.
SECRET_KEYS = frozenset({"api.token", "api.servicePassword"})
REDACTED = "<redacted>"


def shown_value(key: str, value: object) -> object:
    """`value` as it may be shown for `key` (Capacitor's spelling): a secret's is redacted."""
    if key.removeprefix("--config.") in SECRET_KEYS and value not in (None, ""):
        return REDACTED
    return value


def _show(value: object) -> str:
    if value is REDACTED:
        return REDACTED
    text = value.text if isinstance(value, _YamlInt | _YamlFloat) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------------------------
# YAML numbers that remember how they were written


class _YamlInt(int):
    """An int read from a YAML file, with its text: a string-typed key (an AE title, a secret)
    takes the text (`012345` stays `012345`, not YAML 1.1's octal 5349), a whole-number key a
    plain run of digits as decimal."""

    text: str


class _YamlFloat(float):
    text: str


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, except that numbers keep their text (see `_YamlInt`)."""


def _add_number(tag: str, cls: type[_YamlInt] | type[_YamlFloat]) -> None:
    construct = _Loader.yaml_constructors[tag]

    def build(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        value = cls(construct(loader, node))
        value.text = str(node.value)
        return value

    _Loader.add_constructor(tag, build)


_add_number("tag:yaml.org,2002:int", _YamlInt)
_add_number("tag:yaml.org,2002:float", _YamlFloat)


def _as_written(v: Any) -> Any:
    """A YAML number's text, anything else as it is."""
    return v.text if isinstance(v, _YamlInt | _YamlFloat) else v


# ---------------------------------------------------------------------------------------------
# value checkers: (raw value) -> python value, or raise ValueError(reason)


def _int(lo: int | None = 0, hi: int | None = None) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError("must be a whole number")
        text = _as_written(v)
        v = int(text) if isinstance(text, str) and re.fullmatch(r"[+-]?[0-9]+", text) else int(v)
        if lo is not None and v < lo:
            raise ValueError(f"must be at least {lo}" if hi is None else f"must be {lo}..{hi}")
        if hi is not None and v > hi:
            raise ValueError(f"must be {lo}..{hi}")
        return v

    return check


def _float(lo: float = 0.0) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError("must be a number")
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        if v < lo:
            raise ValueError(f"must be at least {lo:g}")
        return float(v)

    return check


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("must be true or false")
    return v


def _str(v: Any) -> str:
    v = _as_written(v)
    if isinstance(v, bool) or not isinstance(v, str | int | float):
        raise ValueError("must be a string")
    return str(v)


def check_ae_title(v: Any) -> str:
    v = _as_written(v)
    if isinstance(v, int) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str):
        raise ValueError("must be a string")
    title = v.strip(" ")  # spaces only: DICOM pads with them; any other control character is refused
    if not title:
        raise ValueError("an AE title cannot be empty")
    if len(title) > 16:
        raise ValueError("an AE title has at most 16 characters")
    if "\\" in title or any(ord(c) < 32 or ord(c) > 126 for c in title):
        raise ValueError("an AE title may not contain backslashes or control characters")
    return title


def _ae_prefix(v: Any) -> str:
    """aeTitlePrefix: blank (no prefixed titles), or what can start an AE title."""
    prefix = _str(v)
    if not prefix.strip(" "):
        return ""
    if prefix.startswith(" "):
        raise ValueError("an AE title prefix cannot start with a space")
    return check_ae_title(prefix + "X")[:-1]  # room for at least one character of the title


def _host(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("must be a host name or IP address")
    host = v.strip()
    if not host:
        raise ValueError("a host name cannot be empty")
    if len(host) > 253 or any(c.isspace() or not c.isprintable() for c in host):
        raise ValueError("must be a host name or IP address (no spaces or control characters)")
    return host


def _port(v: Any) -> int:
    return _int(1, 65535)(v)


def _port_or_off(v: Any) -> int:
    return _int(0, 65535)(v)


def _list(item: Callable[[Any], Any]) -> Callable[[Any], tuple[Any, ...]]:
    def check(v: Any) -> tuple[Any, ...]:
        if isinstance(v, str):  # from the environment or the command line: comma separated
            v = [part.strip() for part in v.split(",") if part.strip()]
        if not isinstance(v, list):
            raise ValueError("must be a list")
        return tuple(item(x) for x in v)

    return check


def check_schedule(v: Any) -> tuple[str, ...]:
    entries = _list(_str)(v)
    try:
        parse_schedule(entries)
    except ScheduleError as e:
        raise ValueError(str(e)) from None
    return entries


def _transfer_syntax(v: Any) -> str:
    name = _str(v).strip()
    if name and name not in TRANSFER_SYNTAX_NAMES and name not in TRANSFER_SYNTAX_NAMES.values():
        raise ValueError("unknown transfer syntax; use one of " + ", ".join(TRANSFER_SYNTAX_NAMES))
    return name


def _time_zone(v: Any) -> str:
    name = _str(v).strip()
    if name:
        try:
            zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError("unknown IANA time zone") from None
    return name


def _uid(v: Any) -> str:
    uid = _str(v).strip()
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)*", uid) or len(uid) > 64:
        raise ValueError("must be a UID (digits and dots, at most 64 characters)")
    return uid


def _sop_class_priority(v: Any) -> str:
    text = _str(v).strip()
    return "default" if text.lower() == "default" else _uid(text)


# ---------------------------------------------------------------------------------------------
# config.yml


@attrs.frozen
class Key:
    name: str  # Capacitor's spelling, dotted for nested keys ("api.port")
    field: str  # our attribute path ("api.port")
    check: Callable[[Any], Any]

    @property
    def env(self) -> str:
        return "CAPACITOR_" + env_name(self.name)


def env_name(key: str) -> str:
    """`myAeTitle` -> `MY_AE_TITLE`, `api.port` -> `API_PORT`, `redactedCFindLogging` ->
    `REDACTED_C_FIND_LOGGING` (Capacitor's rule: an underscore before every capital)."""
    return "_".join(re.sub(r"(?<=.)([A-Z])", r"_\1", part).upper() for part in key.split("."))


GLOBAL_KEYS: tuple[Key, ...] = (
    Key("myAeTitle", "my_ae_title", check_ae_title),
    Key("scpPort", "scp_port", _port_or_off),
    Key("aeTitlePrefix", "ae_title_prefix", _ae_prefix),
    Key("cachePath", "cache_path", _str),
    Key("batchSize", "batch_size", _int(0)),
    Key("processDelay", "process_delay", _int(0)),
    Key("processDelayWindowMultiplier", "process_delay_window_multiplier", _float(0)),
    Key("processSchedule", "process_schedule", check_schedule),
    Key("minimumLineSpeed", "minimum_line_speed", _int(0)),
    Key("stallThresholdSeconds", "stall_threshold_seconds", _int(0)),
    Key("connectTimeoutSeconds", "connect_timeout_seconds", _int(0)),
    Key("clientTimeout", "client_timeout", _int(1)),
    Key("expiryThreshold", "expiry_threshold", _int(1)),
    Key("minFreeSpace", "min_free_space", _int(0, 100)),
    Key("minimumAge", "minimum_age", _int(0)),
    Key("storageInterval", "storage_interval", _int(0)),
    Key("rejectAbstractSyntaxes", "reject_abstract_syntaxes", _list(_uid)),
    Key("maxClientsPerServer", "max_clients_per_server", _int(0)),
    Key("cycleRejectedFilesOnStartup", "cycle_rejected_files_on_startup", _bool),
    Key("defaultTransferSyntax", "default_transfer_syntax", _transfer_syntax),
    Key("api.enabled", "api.enabled", _bool),
    Key("api.port", "api.port", _port),
    Key("api.token", "api.token", _str),
    Key("api.servicePassword", "api.service_password", _str),
    Key("durableWrites", "durable_writes", _bool),
    Key("deliveryProcess", "delivery_process", _bool),
    Key("maxPduSize", "max_pdu_size", _int(4096, 16 * 1024 * 1024)),
    Key("retryDelaySeconds", "retry_delay_seconds", _int(1)),
    Key("retryMaxDelaySeconds", "retry_max_delay_seconds", _int(1)),
    Key("maxAttempts", "max_attempts", _int(0)),
    Key("timeZone", "time_zone", _time_zone),
    Key("chaos.killNodeActorsEverySeconds", "chaos.kill_node_actors_every_seconds", _float(0)),
)
_KEYS_BY_NAME = {k.name: k for k in GLOBAL_KEYS}

# Renamed keys from older Capacitor versions, still accepted.
LEGACY_ALIASES = {"aeTitle": "myAeTitle"}

# Keys DICOM Capacitor documents that capacitor-trio does not implement yet: accepted, warned about.
NOT_IMPLEMENTED_KEYS = frozenset(
    ["activationCode", "autoAdjustLineSpeed", "autoSaveLineSpeed", "ctoConvert", "ctoExpiryMinutes", "ctoOnExpire", "daysToKeepLogs", "dropUnfilteredInstances", "duplicateBehavior", "duplicateThreshold", "echoInterval", "filters", "findScpPort", "holdIncomingStorageAssociations", "limitMaxCMoveResponseRemainingCount", "logSuffix", "maxDataBuffer", "maxEnumeratedFiles", "maxEnumeratedItems", "maxPDVsPerPDU", "moveRejectedCachedFiles", "prefetchConcurrency", "prefetchQueueSize", "queryRetrieveScpPort", "redactedCFindLogging", "redactedCFindLoggingExtraTags", "removeOrphanedIncomingFiles", "sendAbandonGraceSeconds", "storageAssociationHoldExpectedTtlSeconds", "storageCommitAeTitle", "storageCommitPendingNEventReportRequestExpiry", "storageCommitScpPort", "storageCommitSendTimeout", "storageReceiptExpiryHours", "storageTimeoutFloorSeconds", "supervisionFloorMinutes", "suppressLogAeTitles", "suppressWebLog", "worklistAutomationEnabled", "worklistDays", "worklistFilterStored", "worklistInterval", "studyThreshold", "prefetchEnabled"]
)

NODE_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "AeTitle": ("ae_title", check_ae_title),
    "HostName": ("host_name", _host),
    "Port": ("port", _port),
    "NodeRole": ("role", _str),  # checked against NODE_ROLES below
    "Aliases": ("aliases", _list(check_ae_title)),
    "Priority": ("priority", _int(0, 2)),
    "ProcessDelay": ("process_delay", _int(0)),
    "Impersonate": ("impersonate", _bool),
    "TransferSyntax": ("transfer_syntax", _transfer_syntax),
    "BatchSize": ("batch_size", _int(0)),
    "MinimumLineSpeed": ("minimum_line_speed", _int(0)),
    "StallThreshold": ("stall_threshold", _int(0)),
    "ProcessSchedule": ("process_schedule", check_schedule),
    "SopClassPriorities": ("sop_class_priorities", _list(_sop_class_priority)),
}
NODE_KEY_ALIASES = {"Role": "NodeRole"}
NODE_NOT_IMPLEMENTED = frozenset({"ProcessNetworks", "CFindFailureBehavior"})
# Fields whose blank value means "inherit the global value" (kept as None on the Node).
_NODE_NULLABLE = {"process_delay", "batch_size", "minimum_line_speed", "stall_threshold", "sop_class_priorities"}


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), "file", _MISSING, "not found") from None
    except OSError as e:
        raise ConfigError(str(path), "file", _MISSING, f"cannot be read: {e.strerror}") from None
    try:
        return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(str(path), where, _MISSING, f"invalid YAML: {problem}") from None


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name in ("api", "chaos"):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


_BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def _declared_type(field: str) -> Any:
    """The type a Config field is declared with (`api.port` -> int)."""
    cls: Any = Config
    *parents, attr = field.split(".")
    for parent in parents:
        cls = typing.get_type_hints(cls)[parent]
    return typing.get_type_hints(cls)[attr]


def _from_text(key: Key, raw: str) -> Any:
    """A value from the command line or the environment, read by the key's declared type, never
    as YAML: a string key (a secret among them) gets exactly the text given, so `#abc`, `~`,
    `null` and `012345` stay those strings. Text that is not of the type is passed on as it is,
    for the key's check to refuse by name. Blank text keeps the default (None)."""
    text = raw.strip()
    if not text:
        return None
    kind = _declared_type(key.field)
    if kind is bool:
        return _BOOL_WORDS.get(text.lower(), raw)
    if kind is int:
        return int(text) if re.fullmatch(r"[+-]?[0-9]+", text) else raw
    if kind is float:
        return float(text) if _NUMBER.fullmatch(text) else raw
    if typing.get_origin(kind) is tuple:  # `a, b` or `[a, b]`; items are strings
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        return [_unquote(part.strip()) for part in text.split(",") if part.strip()]
    return raw


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


# Filters Capacitor runs on every instance before it is sent (`filters:` names them, each has
# its file in the data directory). None is implemented: running without them would send what
# a site drops or pseudonymises as it arrived, so their presence stops the router.
FILTER_FILES = {"routings.yml": "route", "mutations.yml": "mutate", "sortings.yml": "sort", "lua.yml": "lua"}


def _refuse_filters(source: str, name: str, value: Any) -> None:
    """`filters` set to any filter (from any source) is a config error naming them."""
    items = value if isinstance(value, list) else [] if value is None else str(value).split(",")
    names = [str(item).strip() for item in items if str(item).strip()]
    if names:
        which = f"the {names[0]} filter is" if len(names) == 1 else f"the filters {', '.join(names)} are"
        raise ConfigError(
            source, name, value,
            f"{which} not supported yet (instances would be sent unfiltered); remove the setting to run without filters",
        )


def _refuse_filter_files(data_dir: Path) -> None:
    for file_name, filter_name in FILTER_FILES.items():
        path = data_dir / file_name
        if os.path.lexists(path):
            raise ConfigError(
                str(path), "file", _MISSING,
                f"the {filter_name} filter is not supported yet (instances would be sent unfiltered); "
                "move the file out of the data directory to run without it",
            )


def _read_config_file(config_file: Path, warnings: list[str]) -> dict[str, Any]:
    """config.yml as a flat mapping of dotted keys, legacy names renamed."""
    raw = _read_yaml(config_file)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(str(config_file), "file", _MISSING, "must be a mapping of keys to values")
    for old, new in LEGACY_ALIASES.items():
        if old in raw:
            if new not in raw:
                raw[new] = raw[old]
            del raw[old]
            warnings.append(f"{config_file}: {old} is the old name of {new}; please rename it")
    return _flatten(raw)


def _collect_values(
    flat: Mapping[str, Any],
    config_file: Path,
    environ: Mapping[str, str],
    overrides: Mapping[str, str],
    warnings: list[str],
) -> dict[str, tuple[str, Any]]:
    """key name -> (source, value) from the file, then the environment, then the command line
    (later sources win). A key not implemented yet gets the same treatment from every source:
    one warning per source naming it (`filters` set to a filter is refused instead)."""
    values: dict[str, tuple[str, Any]] = {}
    unknown: list[str] = []
    unimplemented: dict[str, list[str]] = {str(config_file): [], "environment": [], "command line": []}
    for name, value in flat.items():
        if name in _KEYS_BY_NAME:
            values[name] = (str(config_file), value)
        elif name == "filters":
            _refuse_filters(str(config_file), name, value)
        elif name in NOT_IMPLEMENTED_KEYS:
            unimplemented[str(config_file)].append(name)
        else:
            unknown.append(name)
    for key in GLOBAL_KEYS:
        if key.env in environ:
            values[key.name] = (f"environment {key.env}", _from_text(key, environ[key.env]))
    for name in sorted(NOT_IMPLEMENTED_KEYS):
        env = "CAPACITOR_" + env_name(name)
        if env in environ:
            if name == "filters":
                _refuse_filters(f"environment {env}", name, environ[env])
            unimplemented["environment"].append(env)
    for name, raw_value in overrides.items():
        name = LEGACY_ALIASES.get(name, name)
        if name == "filters":
            _refuse_filters(f"command line --config.{name}", name, raw_value)
        if name in NOT_IMPLEMENTED_KEYS:
            unimplemented["command line"].append(f"--config.{name}")
            continue
        if name not in _KEYS_BY_NAME:
            raise ConfigError("command line", f"--config.{name}", _MISSING, "unknown configuration key")
        values[name] = (f"command line --config.{name}", _from_text(_KEYS_BY_NAME[name], raw_value))
    for source, names in unimplemented.items():
        if names:
            warnings.append(f"{source}: keys accepted but not implemented yet (ignored): {', '.join(sorted(names))}")
    if unknown:
        warnings.append(f"{config_file}: unknown keys (ignored): {', '.join(sorted(unknown))}")
    return values


def _build_config(data_dir: Path, values: Mapping[str, tuple[str, Any]]) -> Config:
    fields: dict[str, Any] = {}
    api_fields: dict[str, Any] = {}
    chaos_fields: dict[str, Any] = {}
    for name, (source, value) in values.items():
        key = _KEYS_BY_NAME[name]
        if value is None:  # blank: keep the default
            continue
        try:
            checked = key.check(value)
        except ValueError as e:
            raise ConfigError(source, name, value, str(e)) from None
        target, _, attr = key.field.rpartition(".")
        {"": fields, "api": api_fields, "chaos": chaos_fields}[target][attr or key.field] = checked

    cache = fields.pop("cache_path", "")
    cache_path = Path(cache) if cache else data_dir / "cache"
    if not cache_path.is_absolute():
        cache_path = data_dir / cache_path
    return Config(
        data_dir=data_dir,
        cache_path=cache_path,
        api=ApiConfig(**api_fields),
        chaos=ChaosConfig(**chaos_fields),
        **fields,
    )


def load_settings(
    data_dir: Path,
    *,
    overrides: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Read `config.yml` and `nodes.yml` from `data_dir` and apply env and CLI overrides."""
    environ = os.environ if environ is None else environ
    warnings: list[str] = []
    config_file = data_dir / "config.yml"
    flat = _read_config_file(config_file, warnings)
    values = _collect_values(flat, config_file, environ, overrides or {}, warnings)
    config = _build_config(data_dir, values)
    _refuse_filter_files(data_dir)
    if config.retry_max_delay_seconds < config.retry_delay_seconds:
        raise ConfigError(
            str(config_file), "retryMaxDelaySeconds", config.retry_max_delay_seconds,
            "must not be smaller than retryDelaySeconds",
        )
    if config.default_transfer_syntax:
        warnings.append(
            "defaultTransferSyntax is accepted but transcoding is not implemented yet: "
            "instances are sent in the syntax they were received in"
        )
    if config.api.enabled and not config.api.auth_required:
        warnings.append(
            "api: neither api.token nor api.servicePassword is set: the API's write endpoints are "
            "open to anyone who can reach it"
        )
    nodes = load_nodes(data_dir / "nodes.yml", warnings, prefix=config.ae_title_prefix)
    return Settings(config=config, nodes=nodes, warnings=tuple(warnings), overrides=dict(overrides or {}))


def parse_node(entry: Any, source: str, index: int, warnings: list[str] | None = None) -> Node:
    """One nodes.yml mapping -> Node. Used by the loader and by the API's PUT."""
    where = f"{source}: node {index + 1}"
    if not isinstance(entry, dict):
        raise ConfigError(where, "entry", entry, "each node must be a mapping (AeTitle: ..., HostName: ...)")
    entry = {NODE_KEY_ALIASES.get(k, k): v for k, v in entry.items()}
    if "AeTitle" in entry:
        with contextlib.suppress(ValueError):
            where = f"{source}: node {check_ae_title(entry['AeTitle'])}"
    fields: dict[str, Any] = {}
    ignored = []
    for key, value in entry.items():
        if key not in NODE_KEYS:
            ignored.append(key)
            continue
        attr, check = NODE_KEYS[key]
        if value is None and attr == "host_name":
            raise ConfigError(where, key, value, "a host name cannot be empty")
        if value is None or (value == "" and attr in _NODE_NULLABLE):
            continue  # blank: inherit / default
        try:
            fields[attr] = check(value)
        except ValueError as e:
            raise ConfigError(where, key, value, str(e)) from None
    if "ae_title" not in fields:
        raise ConfigError(where, "AeTitle", _MISSING, "is required")
    role = fields.get("role", "Storage")
    if role not in NODE_ROLES:
        raise ConfigError(where, "NodeRole", role, "must be one of " + ", ".join(NODE_ROLES))
    if ignored and warnings is not None:
        known = [k for k in ignored if k in NODE_NOT_IMPLEMENTED]
        other = [k for k in ignored if k not in NODE_NOT_IMPLEMENTED]
        if known:
            warnings.append(f"{where}: keys accepted but not implemented yet (ignored): {', '.join(sorted(known))}")
        if other:
            warnings.append(f"{where}: unknown keys (ignored): {', '.join(sorted(other))}")
    if fields.get("transfer_syntax") and warnings is not None:
        warnings.append(f"{where}: TransferSyntax is accepted but transcoding is not implemented yet")
    return Node(**fields)


def load_nodes(path: Path, warnings: list[str], *, prefix: str = DEFAULT_PREFIX) -> tuple[Node, ...]:
    raw = _read_yaml(path)
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(str(path), "file", _MISSING, "must be a YAML list of nodes")
    nodes = tuple(parse_node(entry, str(path), i, warnings) for i, entry in enumerate(raw))
    check_node_set(nodes, str(path), prefix=prefix)
    return nodes


def check_node_set(
    nodes: Sequence[Node], source: str, *, prefix: str = DEFAULT_PREFIX, edited: Node | None = None
) -> None:
    """Node identities must be unambiguous: (AeTitle, NodeRole) unique, and every called AE a
    Storage node answers to (its title, its aliases, and both with `prefix` = aeTitlePrefix in
    front) names that one Storage node only. The start-up loader, check-config and the API's
    PUT all check with this; a clash is reported on the later node, or on `edited` (the node a
    PUT changes), naming the other node too."""
    seen: set[tuple[str, str]] = set()
    called: dict[str, tuple[Node, str]] = {}
    ordered = [n for n in nodes if n is not edited] + ([edited] if edited is not None else [])
    for node in ordered:
        if node.key in seen:
            raise ConfigError(
                f"{source}: node {node.ae_title}", "AeTitle", node.ae_title,
                f"duplicate node: AeTitle and NodeRole {node.role} already used by another node",
            )
        seen.add(node.key)
        if node.role != "Storage":
            continue
        for route in called_aes(node, prefix):
            first = called.get(route.called_ae)
            if first is None:
                called[route.called_ae] = (node, route.how)
            elif first[0].ae_title != node.ae_title:
                raise ConfigError(
                    f"{source}: node {node.ae_title}", route.key, route.value,
                    f"called AE {route.called_ae} ({route.how}) already names Storage node "
                    f"{first[0].ae_title} ({first[1]}); a called AE must name one Storage node",
                )


# ---------------------------------------------------------------------------------------------
# writing

DEFAULT_CONFIG_YML = """\
# capacitor-trio configuration (DICOM Capacitor compatible). See config.yml.example for every key.
myAeTitle: CAPACITOR
scpPort: 1040
api:
  enabled: true
  port: 1080
"""


def ensure_data_dir(data_dir: Path) -> bool:
    """Create a data directory with a default config.yml and an empty nodes.yml when missing.
    Returns True when anything was created."""
    created = False
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # 0700: it holds the API's secrets
    for name, text in (("config.yml", DEFAULT_CONFIG_YML), ("nodes.yml", "[]\n")):
        try:  # 0600, and never through a symbolic link (O_EXCL refuses one, dangling or not)
            fd = os.open(data_dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        with open(fd, "w", encoding="utf-8") as f:
            f.write(text)
        created = True
    return created


def node_to_yaml(node: Node) -> dict[str, Any]:
    """A Node as a nodes.yml mapping (PascalCase), leaving blank overrides out."""
    out: dict[str, Any] = {}
    for key, (attr, _check) in NODE_KEYS.items():
        value = getattr(node, attr)
        if value is None or (value == () and attr != "aliases") or (value == "" and attr == "transfer_syntax"):
            continue
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def redacted(settings: Settings) -> dict[str, Any]:
    """The effective settings in Capacitor's spelling, secrets redacted (for check-config)."""
    c = settings.config
    out: dict[str, Any] = {}
    for key in GLOBAL_KEYS:
        obj: Any = c
        for part in key.field.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, tuple):
            obj = list(obj)
        if isinstance(obj, Path):
            obj = str(obj)
        obj = shown_value(key.name, obj)
        head, _, tail = key.name.partition(".")
        if tail:
            out.setdefault(head, {})[tail] = obj
        else:
            out[head] = obj
    return {"config": out, "nodes": [node_to_yaml(n) for n in settings.nodes]}
