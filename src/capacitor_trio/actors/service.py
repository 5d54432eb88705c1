"""Global service flags (Capacitor's pause-all / resume-all)."""

from __future__ import annotations

import attrs
from trio_util import AsyncValue

FLAG_NAMES = ("storageScu", "worklistScu", "storageCommitScu", "prepare")


@attrs.frozen
class Flags:
    """Storage SCU (delivery), Worklist SCU, Storage Commit SCU and Prepare, at one moment."""

    storage_scu: bool = True
    worklist_scu: bool = True
    storage_commit_scu: bool = True
    prepare: bool = True


@attrs.define(eq=False)
class ServiceFlags:
    """The service's flags as an `AsyncValue[Flags]` (`flags`): a task that acts on a flag waits
    on it (`wait_value`, `transitions`), so waiting tasks look again at once when it changes (the
    supervisor wakes the node actors and their prepare stages). Receiving continues
    whatever the flags say."""

    flags: AsyncValue[Flags] = attrs.field(factory=lambda: AsyncValue(Flags()))

    def set_all(self, enabled: bool) -> None:
        self.flags.value = Flags(enabled, enabled, enabled, enabled)

    @property
    def storage_scu(self) -> bool:
        return self.flags.value.storage_scu

    @storage_scu.setter
    def storage_scu(self, enabled: bool) -> None:
        self.flags.value = attrs.evolve(self.flags.value, storage_scu=enabled)

    @property
    def prepare(self) -> bool:
        return self.flags.value.prepare

    @prepare.setter
    def prepare(self, enabled: bool) -> None:
        self.flags.value = attrs.evolve(self.flags.value, prepare=enabled)

    @property
    def all_paused(self) -> bool:
        f = self.flags.value
        return not (f.storage_scu or f.worklist_scu or f.storage_commit_scu or f.prepare)

    def as_dict(self) -> dict[str, bool]:
        f = self.flags.value
        return {
            "storageScu": f.storage_scu,
            "worklistScu": f.worklist_scu,
            "storageCommitScu": f.storage_commit_scu,
            "prepare": f.prepare,
        }
