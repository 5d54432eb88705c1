"""A data directory for a `capacitor-trio run` subprocess (config.yml, nodes.yml) and the
filter-file fragments several tests share."""

from __future__ import annotations

from pathlib import Path

# The Conditions of a routing entry that match CT, and its Actions list, whose first action
# adds the destination VNA (more items of the list may follow).
CT_ALSO_TO_VNA = """\
  Conditions:
    - Tag: 8,60
      MatchExpression: CT
  Actions:
    - Type: add_destination
      Target: VNA
"""

# An item of a mutation entry's Actions list: PatientName "DOE^JANE" becomes "JANE DOE".
SWAP_PATIENT_NAME = """\
    - Type: add_or_update
      Source:
        Tag: 10,10
        Expression: ^(\\w+)\\^(\\w+)$
      Destination:
        Tag: 10,10
        Value: $2 $1
"""

# An item of a mutation entry's Actions list: AccessionNumber removed.
REMOVE_ACCESSION_NUMBER = """\
    - Type: remove
      Destination:
        Tag: 8,50
"""


def write_router_files(data: Path, scp_port: int, nodes: str, *, minimum_age: int = 0, extra: str = "") -> None:
    """config.yml (AE ROUTER on `scp_port`, queues drained at once, retries after 1 to 2 s, no
    HTTP API, then `extra`) and nodes.yml (`nodes`, YAML text) in `data`."""
    data.mkdir(parents=True, exist_ok=True)
    (data / "config.yml").write_text(
        f"myAeTitle: ROUTER\nscpPort: {scp_port}\nminimumAge: {minimum_age}\nstorageInterval: 0\n"
        f"retryDelaySeconds: 1\nretryMaxDelaySeconds: 2\napi:\n  enabled: false\n{extra}"
    )
    (data / "nodes.yml").write_text(nodes)
