"""Configuration values: frozen attrs models with snake_case fields.

config/ (`load.py`, its key tables in `keys.py` and checkers in `values.py`, `nodes_file.py`) is
the only code that reads YAML and knows Capacitor's spellings (`scpPort`, `AeTitle`, ...);
everything else in the router sees these values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import attrs

from capacitor_trio.domain.filters import NO_FILTERS, FilterChain

#: aeTitlePrefix's default: node PACS also answers to called AE DCP_PACS.
DEFAULT_PREFIX = "DCP_"

NODE_ROLES = ("Storage", "QueryRetrieve", "Worklist", "StorageCommitSCP", "StorageCommitSCU")

# Transfer syntax names Capacitor accepts for `defaultTransferSyntax` and node `TransferSyntax`.
TRANSFER_SYNTAX_NAMES = {
    "ImplicitVRLittleEndian": "1.2.840.10008.1.2",
    "ExplicitVRLittleEndian": "1.2.840.10008.1.2.1",
    "ExplicitVRBigEndian": "1.2.840.10008.1.2.2",
    "JPEGProcess14SV1": "1.2.840.10008.1.2.4.70",
    "JPEGLossless": "1.2.840.10008.1.2.4.70",
    "JPEGProcess14": "1.2.840.10008.1.2.4.57",
    "JPEG2000Lossless": "1.2.840.10008.1.2.4.90",
    "RLELossless": "1.2.840.10008.1.2.5",
    "JPEG2000Lossy": "1.2.840.10008.1.2.4.91",
    "JPEGLSNearLossless": "1.2.840.10008.1.2.4.81",
    "JPEGProcess1": "1.2.840.10008.1.2.4.50",
    "JPEGProcess2_4": "1.2.840.10008.1.2.4.51",
}


def transfer_syntax_uid(value: str) -> str:
    """The UID a `TransferSyntax` / `defaultTransferSyntax` value names: one of the names of
    TRANSFER_SYNTAX_NAMES, or one of their UIDs as it is; "" (blank) stays "" (keep the syntax
    each instance was received in)."""
    return TRANSFER_SYNTAX_NAMES.get(value, value)


@attrs.frozen
class ApiConfig:
    enabled: bool = False
    port: int = 1080
    token: str = ""
    service_password: str = ""

    @property
    def auth_required(self) -> bool:
        """Write endpoints are open only when neither credential is configured."""
        return bool(self.token or self.service_password)


@attrs.frozen
class ChaosConfig:
    """Fault injection for soak tests. Never on by default."""

    kill_node_actors_every_seconds: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.kill_node_actors_every_seconds > 0


@attrs.frozen
class Config:
    """Effective global settings (config.yml after env and command-line overrides)."""

    data_dir: Path
    cache_path: Path
    my_ae_title: str = "CAPACITOR"
    scp_port: int = 1040
    ae_title_prefix: str = DEFAULT_PREFIX
    batch_size: int = 0
    process_delay: int = 0  # ms
    process_delay_window_multiplier: float = 1.0
    process_schedule: tuple[str, ...] = ()
    minimum_line_speed: int = 500  # KB/s, 0 disables
    stall_threshold_seconds: int = 90  # 0 disables
    connect_timeout_seconds: int = 30  # 0 = OS default
    client_timeout: int = 600  # s
    expiry_threshold: int = 604800  # s
    min_free_space: int = 10  # percent
    minimum_age: int = 2  # s
    storage_interval: int = 250  # ms between batches
    reject_abstract_syntaxes: tuple[str, ...] = ()
    max_clients_per_server: int = 0  # 0 = unlimited
    cycle_rejected_files_on_startup: bool = True
    default_transfer_syntax: str = ""
    filters: tuple[str, ...] = ()  # the chain as config.yml names it
    drop_unfiltered_instances: bool = False
    api: ApiConfig = ApiConfig()
    # capacitor-trio's own keys
    durable_writes: bool = True
    #: node actors' associations run in a child process (a second core for sending)
    delivery_process: bool = True
    max_pdu_size: int = 1_048_576
    retry_delay_seconds: int = 30
    retry_max_delay_seconds: int = 900
    max_attempts: int = 0  # 0 = retry until expiry
    time_zone: str = ""  # IANA name; "" = the system's
    chaos: ChaosConfig = ChaosConfig()
    #: the filter chain `filters` names, its files read (config/filters.py): the prepare stage
    #: runs it; a reload of the filters replaces it (with `attrs.evolve`)
    filter_chain: FilterChain = NO_FILTERS
    #: the instance identity in main-log lines: `#{group,element}` placeholders (hex) for the
    #: instance's tags (logs.py's `instance_identity`)
    log_suffix: str = "#{2,2}-#{8,50}-#{10,20}"
    #: calling AE titles whose associations are not logged (monitoring probes)
    suppress_log_ae_titles: tuple[str, ...] = ("HEALTHCHECK",)
    #: no API/web request log file
    suppress_web_log: bool = False


#: how a running part of the router reads the configuration in force, where it uses it: the one
#: owner is the router's `in_force` (runtime.py), which a reload replaces whole
ConfigSource = Callable[[], Config]


def config_source(value: Config | ConfigSource) -> ConfigSource:
    """A source as given, or a fixed Config as one (tests and tools run on a fixed one)."""
    if isinstance(value, Config):
        return lambda: value
    return value


@attrs.frozen
class Node:
    """One entry of nodes.yml. `None` in an override field means blank: inherit the global value."""

    ae_title: str
    host_name: str = "127.0.0.1"
    port: int = 104
    role: str = "Storage"
    aliases: tuple[str, ...] = ()
    priority: int = 0
    process_delay: int | None = None
    impersonate: bool = False
    transfer_syntax: str = ""
    batch_size: int | None = None
    minimum_line_speed: int | None = None
    stall_threshold: int | None = None
    process_schedule: tuple[str, ...] = ()
    sop_class_priorities: tuple[str, ...] | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.ae_title, self.role)


@attrs.frozen
class CalledAe:
    """One called AE title a Storage node answers to, and where it comes from."""

    called_ae: str
    key: str  # the nodes.yml key it comes from: "AeTitle" or "Aliases"
    value: str  # that key's title (the AeTitle or the alias)
    prefixed: bool  # aeTitlePrefix + value

    @property
    def how(self) -> str:
        what = "its AeTitle" if self.key == "AeTitle" else f"its alias {self.value}"
        return f"aeTitlePrefix + {what}" if self.prefixed else what


def called_aes(node: Node, prefix: str) -> tuple[CalledAe, ...]:
    """Every called AE a Storage node answers to: its AeTitle, its aliases, and each of them
    with `prefix` (aeTitlePrefix) in front. The receiver's route table and the config's
    uniqueness check both come from here."""
    own = [CalledAe(node.ae_title, "AeTitle", node.ae_title, False)]
    own += [CalledAe(alias, "Aliases", alias, False) for alias in node.aliases]
    if not prefix:
        return tuple(own)
    return (*own, *(attrs.evolve(c, called_ae=prefix + c.value, prefixed=True) for c in own))


@attrs.frozen
class NodeSettings:
    """A node's effective delivery settings: its overrides, or the global values where blank."""

    batch_size: int
    process_delay_ms: int
    minimum_line_speed: int
    stall_threshold: int
    process_schedule: tuple[str, ...]
    #: the UID of the syntax the node's prepared copies are in: the node's `TransferSyntax`,
    #: else `defaultTransferSyntax`; "" keeps the syntax each instance was received in
    transfer_syntax: str


def effective_schedule(node: Node, config: Config) -> tuple[str, ...]:
    """The node's ProcessSchedule, or the global processSchedule when it has none (empty:
    always open)."""
    return tuple(node.process_schedule or config.process_schedule)


def effective(node: Node, config: Config) -> NodeSettings:
    def pick(value: int | None, default: int) -> int:
        return default if value is None else value

    return NodeSettings(
        batch_size=pick(node.batch_size, config.batch_size),
        process_delay_ms=pick(node.process_delay, config.process_delay),
        minimum_line_speed=pick(node.minimum_line_speed, config.minimum_line_speed),
        stall_threshold=pick(node.stall_threshold, config.stall_threshold_seconds),
        process_schedule=effective_schedule(node, config),
        transfer_syntax=transfer_syntax_uid(node.transfer_syntax or config.default_transfer_syntax),
    )


@attrs.frozen
class Settings:
    """Everything the router runs with: global config and the node list."""

    config: Config
    nodes: tuple[Node, ...] = ()
    warnings: tuple[str, ...] = ()
    #: the command line's `--config.<key>=<value>` overrides, applied again by a reload
    overrides: Mapping[str, str] = attrs.field(factory=dict)

    def storage_nodes(self) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if n.role == "Storage")
