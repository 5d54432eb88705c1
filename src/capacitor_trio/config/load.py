"""Reading config.yml and nodes.yml into frozen values, checking them, and writing a new data
directory. config/ is the one place that knows Capacitor's spellings: the key tables are
keys.py's, the value checkers values.py's, nodes.yml edits nodes_file.py's.

Precedence for global keys: `--config.<key>=<value>` on the command line > environment variable
`CAPACITOR_<UPPER_SNAKE_KEY>` > config.yml > defaults. config.yml is YAML; a value from the
command line or the environment is plain text read by the key's declared type (a string stays the
exact string given). Any error raises `ConfigError`, whose text is one line naming the file, the
key and the value (secrets redacted).
"""

from __future__ import annotations

import contextlib
import os
import re
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import yaml

from capacitor_trio.config.keys import (
    _KEYS_BY_NAME,
    _NODE_NULLABLE,
    GLOBAL_KEYS,
    LEGACY_ALIASES,
    NODE_KEY_ALIASES,
    NODE_KEYS,
    NODE_NOT_IMPLEMENTED,
    NOT_IMPLEMENTED_KEYS,
    Key,
    env_name,
)
from capacitor_trio.config.models import (
    DEFAULT_PREFIX,
    NODE_ROLES,
    ApiConfig,
    ChaosConfig,
    Config,
    Node,
    Settings,
    called_aes,
)
from capacitor_trio.config.values import _Loader, _YamlFloat, _YamlInt, check_ae_title


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


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), "file", _MISSING, "not found") from None
    except OSError as e:
        raise ConfigError(str(path), "file", _MISSING, f"cannot be read: {e.strerror}") from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, source: str, loader: type[_Loader] = _Loader) -> Any:
    """YAML text as the loader reads it (numbers keep their text: `values._Loader`)."""
    try:
        return yaml.load(text, Loader=loader)  # _Loader is a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(source, where, _MISSING, f"invalid YAML: {problem}") from None


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
    one warning per source naming it."""
    values: dict[str, tuple[str, Any]] = {}
    unknown: list[str] = []
    unimplemented: dict[str, list[str]] = {str(config_file): [], "environment": [], "command line": []}
    for name, value in flat.items():
        if name in _KEYS_BY_NAME:
            values[name] = (str(config_file), value)
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
            unimplemented["environment"].append(env)
    for name, raw_value in overrides.items():
        name = LEGACY_ALIASES.get(name, name)
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
    if config.retry_max_delay_seconds < config.retry_delay_seconds:
        raise ConfigError(
            str(config_file), "retryMaxDelaySeconds", config.retry_max_delay_seconds,
            "must not be smaller than retryDelaySeconds",
        )
    if config.api.enabled and not config.api.auth_required:
        warnings.append(
            "api: neither api.token nor api.servicePassword is set: the API's write endpoints are "
            "open to anyone who can reach it"
        )
    nodes = load_nodes(data_dir / "nodes.yml", warnings, prefix=config.ae_title_prefix)
    config = _with_filters(config, nodes, warnings)
    return Settings(config=config, nodes=nodes, warnings=tuple(warnings), overrides=dict(overrides or {}))


def _with_filters(config: Config, nodes: Sequence[Node], warnings: list[str]) -> Config:
    from capacitor_trio.config.filters import load_chain  # config/filters.py imports this module

    storage = frozenset(n.ae_title for n in nodes if n.role == "Storage")
    return attrs.evolve(config, filter_chain=load_chain(config, storage, warnings))


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
