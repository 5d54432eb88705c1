"""Configuration reload (SIGHUP, `POST /api/config/reload`): read config.yml and nodes.yml again,
check everything first, then apply what can change while the router runs.

Nothing is applied unless everything is valid: a file that does not load, a node set that is
ambiguous, or a Storage node removed while it still has queued items refuses the whole reload,
and the configuration in force stays as it was.

What is applied:
- nodes.yml: added Storage nodes get an actor, removed ones are stopped (what they had checked
  out goes back to the queue first), edited ones use their new settings from their next batch;
  the called-AE routes are rebuilt.
- config.yml: the keys in `RELOADABLE_KEYS`, which the node actors and the receiver read each
  time they use them. Any other key that changed is listed as needing a restart.
- the filter chain: `filters` and `dropUnfilteredInstances`, and the filter files they name
  (routings.yml, mutations.yml, sortings.yml), read again and checked against the new node set
  with the rest (`load_settings`), as `POST /api/filters/reload` does; the prepare stages use
  the new chain from their next look. A chain that changed is reported as `filters`.

One configuration change at a time (`Router.config_lock`, which node edits through the API take
too): two overlapping changes would each start from the same old state.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import attrs
import trio

from capacitor_trio.config.filters import load_chain
from capacitor_trio.config.load import GLOBAL_KEYS, load_settings
from capacitor_trio.config.models import Config, Node
from capacitor_trio.domain.filters import describe, summary
from capacitor_trio.domain.instance import Destination

if TYPE_CHECKING:
    from capacitor_trio.runtime import Router

log = logging.getLogger("capacitor_trio.reload")

#: Config attributes a reload applies: the ones node actors, the receiver and the expiry task
#: read where they use them.
RELOADABLE_KEYS = (
    "ae_title_prefix",
    "batch_size",
    "process_delay",
    "process_delay_window_multiplier",
    "process_schedule",
    "minimum_line_speed",
    "stall_threshold_seconds",
    "connect_timeout_seconds",
    "expiry_threshold",
    "minimum_age",
    "storage_interval",
    "default_transfer_syntax",
    "retry_delay_seconds",
    "retry_max_delay_seconds",
    "max_attempts",
    "time_zone",
    "filters",
    "drop_unfiltered_instances",
)


class ReloadRefused(Exception):
    """The new configuration cannot be applied; str() is one line for the operator."""


class ApplyFailed(Exception):
    """Applying a valid configuration failed part-way (a store error starting a node)."""


@attrs.frozen
class ReloadReport:
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    config_changed: tuple[str, ...] = ()
    needs_restart: tuple[str, ...] = ()


@attrs.frozen
class _NodeDiff:
    added: tuple[Node, ...]
    removed: tuple[Node, ...]
    changed: tuple[Node, ...]



async def reload_configuration(router: Router) -> ReloadReport:
    """Reload and apply, or raise ReloadRefused (ConfigError for an invalid file) with the
    configuration in force untouched. Either way one log line says what happened."""
    async with router.config_lock:
        try:
            report = await _reload(router)
        except ApplyFailed as exc:
            log.error("configuration reload failed while it was being applied: %s", exc)
            raise
        except Exception as exc:
            log.error("configuration reload refused, the previous configuration stays in force: %s", exc)
            raise
    log.info("configuration reloaded: %s", _summary(report))
    for key in report.needs_restart:
        log.warning("configuration reload: %s changed in config.yml; it takes effect at the next restart", key)
    return report


async def _reload(router: Router) -> ReloadReport:
    old = router.settings
    new = await trio.to_thread.run_sync(
        lambda: load_settings(old.config.data_dir, overrides=old.overrides)
    )
    diff = _diff_nodes(old.nodes, new.nodes)
    await _check_removals(router, diff.removed)
    config, config_changed, needs_restart = _merge_config(old.config, new.config)
    # All or nothing once it starts: a caller that goes away meanwhile (an HTTP client that
    # disconnects) must not leave a node routed with no actor, or an actor with no route.
    with trio.CancelScope(shield=True):
        try:
            router.settings = attrs.evolve(new, config=config)
            await _apply_nodes(router, diff)
            for handle in router.supervisor.handles:  # minimumAge may have changed
                handle.wake_preparer()
        except Exception as exc:
            raise ApplyFailed(f"{exc!r}; the new configuration is in force in part: reload again") from exc
    return ReloadReport(
        added=_titles(diff.added),
        removed=_titles(diff.removed),
        changed=_titles(diff.changed),
        config_changed=config_changed,
        needs_restart=needs_restart,
    )


def _diff_nodes(old: tuple[Node, ...], new: tuple[Node, ...]) -> _NodeDiff:
    before = {n.key: n for n in old}
    after = {n.key: n for n in new}
    return _NodeDiff(
        added=tuple(n for k, n in after.items() if k not in before),
        removed=tuple(n for k, n in before.items() if k not in after),
        changed=tuple(n for k, n in after.items() if k in before and before[k] != n),
    )


async def _check_removals(router: Router, removed: tuple[Node, ...]) -> None:
    for node in removed:
        if node.role != "Storage":
            continue
        counts = await router.store.counts(Destination(node.ae_title, node.role))
        if counts.total:
            raise ReloadRefused(
                f"nodes.yml: node {node.ae_title} was removed but still has {counts.total} "
                "queued item(s); move or delete them first, or keep the node"
            )


def _merge_config(old: Config, new: Config) -> tuple[Config, tuple[str, ...], tuple[str, ...]]:
    """The config in force after a reload (`old` with the reloadable keys of `new` and its filter
    chain), the keys applied ("filters" also when only a filter file changed) and the keys that
    changed but wait for a restart, both in config.yml's spelling."""
    changed = [key for key in GLOBAL_KEYS if _value(old, key.field) != _value(new, key.field)]
    applied = [key for key in changed if key.field in RELOADABLE_KEYS]
    merged = attrs.evolve(
        old, filter_chain=new.filter_chain, **{key.field: _value(new, key.field) for key in applied}
    )
    names = [key.name for key in applied]
    if new.filter_chain != old.filter_chain and "filters" not in names:  # a filter file changed
        names.append("filters")
    waiting = tuple(key.name for key in changed if key.field not in RELOADABLE_KEYS)
    return merged, tuple(names), waiting


def _value(config: Config, field: str) -> Any:
    value: Any = config
    for part in field.split("."):
        value = getattr(value, part)
    return value


async def _apply_nodes(router: Router, diff: _NodeDiff) -> None:
    """The receiver routes by `router.settings`, already the new node set, so nothing more is
    queued for a node being removed; then the actors."""
    supervisor = router.supervisor
    for node in diff.removed:
        if node.role == "Storage":
            await supervisor.remove(node.key)
            left = (await router.store.counts(Destination(node.ae_title, node.role))).total
            if left:  # committed while the routes were being switched
                log.warning(
                    "node %s was removed with %d item(s) queued since the reload began; "
                    "they wait in the queue (move or delete them, or add the node again)",
                    node.ae_title, left,
                )
    for node in diff.changed:
        if node.role == "Storage":
            supervisor.settings_changed(node.key)
    for node in diff.added:
        if node.role == "Storage":
            await supervisor.add(node)


def _titles(nodes: tuple[Node, ...]) -> tuple[str, ...]:
    return tuple(f"{n.ae_title} ({n.role})" if n.role != "Storage" else n.ae_title for n in nodes)


def _summary(report: ReloadReport) -> str:
    parts = [
        f"{label} {', '.join(values)}"
        for label, values in (
            ("added", report.added),
            ("removed", report.removed),
            ("changed", report.changed),
            ("config", report.config_changed),
        )
        if values
    ]
    return "; ".join(parts) or "no change"



async def reload_filters(router: Router) -> dict[str, Any]:
    """`POST /api/filters/reload`: read the filter files config.yml's `filters` names again,
    check them all (and their add_destination targets against the Storage nodes in force), and
    only then put the new chain in force; a ConfigError (the first error, one line) leaves the
    chain in force untouched. Returns the new chain as `GET /api/filters` shows it."""
    async with router.config_lock:
        old = router.settings
        storage = frozenset(n.ae_title for n in old.nodes if n.role == "Storage")
        warnings: list[str] = []
        try:
            chain = await trio.to_thread.run_sync(lambda: load_chain(old.config, storage, warnings))
        except Exception as exc:
            log.error("filters reload refused, the filters in force stay: %s", exc)
            raise
        config = attrs.evolve(old.config, filter_chain=chain)
        router.settings = attrs.evolve(old, config=config)
        for handle in router.supervisor.handles:  # items waiting may pass other steps now
            handle.wake_preparer()
    for warning in warnings:
        log.warning("%s", warning)
    log.info("filters reloaded: %s", summary(chain))
    return describe(chain)
