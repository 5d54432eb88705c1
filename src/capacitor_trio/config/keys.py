"""The key tables: every config.yml key (Capacitor's spelling, our attribute, its checker), the
nodes.yml keys, the legacy names still accepted, the keys accepted but not implemented yet, and
the filter files. config/load.py reads with them; nothing else spells them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import attrs

from capacitor_trio.config.values import (
    _ae_prefix,
    _bool,
    _float,
    _host,
    _int,
    _list,
    _port,
    _port_or_off,
    _sop_class_priority,
    _str,
    _time_zone,
    _transfer_syntax,
    _uid,
    check_ae_title,
    check_filter_names,
    check_schedule,
)


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
    Key("filters", "filters", check_filter_names),
    Key("dropUnfilteredInstances", "drop_unfiltered_instances", _bool),
    Key("chaos.killNodeActorsEverySeconds", "chaos.kill_node_actors_every_seconds", _float(0)),
)
_KEYS_BY_NAME = {k.name: k for k in GLOBAL_KEYS}

# Renamed keys from older Capacitor versions, still accepted.
LEGACY_ALIASES = {"aeTitle": "myAeTitle"}

# Keys DICOM Capacitor documents that capacitor-trio does not implement yet: accepted, warned about.
NOT_IMPLEMENTED_KEYS = frozenset(
    ["activationCode", "autoAdjustLineSpeed", "autoSaveLineSpeed", "ctoConvert", "ctoExpiryMinutes", "ctoOnExpire", "daysToKeepLogs", "duplicateBehavior", "duplicateThreshold", "echoInterval", "findScpPort", "holdIncomingStorageAssociations", "limitMaxCMoveResponseRemainingCount", "logSuffix", "maxDataBuffer", "maxEnumeratedFiles", "maxEnumeratedItems", "maxPDVsPerPDU", "moveRejectedCachedFiles", "prefetchConcurrency", "prefetchQueueSize", "queryRetrieveScpPort", "redactedCFindLogging", "redactedCFindLoggingExtraTags", "removeOrphanedIncomingFiles", "sendAbandonGraceSeconds", "storageAssociationHoldExpectedTtlSeconds", "storageCommitAeTitle", "storageCommitPendingNEventReportRequestExpiry", "storageCommitScpPort", "storageCommitSendTimeout", "storageReceiptExpiryHours", "storageTimeoutFloorSeconds", "supervisionFloorMinutes", "suppressLogAeTitles", "suppressWebLog", "worklistAutomationEnabled", "worklistDays", "worklistFilterStored", "worklistInterval", "studyThreshold", "prefetchEnabled"]
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

# The filters' files in the data directory, by the name `filters:` gives the filter
# (config/filters.py reads them; lua is refused by `filters:`, see values.check_filter_names).
FILTER_FILES = {"routings.yml": "route", "mutations.yml": "mutate", "sortings.yml": "sort", "lua.yml": "lua"}
