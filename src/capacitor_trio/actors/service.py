"""Global service flags (Capacitor's pause-all / resume-all)."""

from __future__ import annotations

from collections.abc import Callable

import attrs

FLAG_NAMES = ("storageScu", "worklistScu", "storageCommitScu", "prepare")


@attrs.define
class ServiceFlags:
    """Storage SCU (delivery), Worklist SCU, Storage Commit SCU and Prepare.

    Receiving continues whatever the flags say. Changing a flag calls every registered listener
    (node handles' `wake`, the preparer's wake) so waiting tasks look again at once."""

    storage_scu: bool = True
    worklist_scu: bool = True
    storage_commit_scu: bool = True
    prepare: bool = True
    _listeners: list[Callable[[], None]] = attrs.field(factory=list, repr=False)

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def set_all(self, enabled: bool) -> None:
        self.storage_scu = self.worklist_scu = self.storage_commit_scu = self.prepare = enabled
        for listener in self._listeners:
            listener()

    @property
    def all_paused(self) -> bool:
        return not (self.storage_scu or self.worklist_scu or self.storage_commit_scu or self.prepare)

    def as_dict(self) -> dict[str, bool]:
        return {
            "storageScu": self.storage_scu,
            "worklistScu": self.worklist_scu,
            "storageCommitScu": self.storage_commit_scu,
            "prepare": self.prepare,
        }
