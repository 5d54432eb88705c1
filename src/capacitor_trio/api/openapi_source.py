"""The source of `openapi.json` (OpenAPI 3.1), written as Python to keep it short and consistent.

The JSON file is what the API serves and what the package ships; a test checks it equals
`build()` and that it lists exactly the app's routes. Regenerate after a change with::

    python -m capacitor_trio.api.openapi_source > src/capacitor_trio/api/openapi.json
"""

from __future__ import annotations

import json
from typing import Any

from capacitor_trio.config.models import NODE_ROLES
from capacitor_trio.domain.states import ALL_STATES

STATES = [s.value for s in ALL_STATES]
CODES = ["BAD_REQUEST", "FORBIDDEN", "NOT_FOUND", "CONFLICT", "TOO_MANY_REQUESTS", "INTERNAL", "UNAVAILABLE"]

S = dict[str, Any]


def ref(name: str) -> S:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(props: S, required: list[str] | None = None, *, extra: bool = False) -> S:
    out: S = {"type": "object", "properties": props, "required": list(props) if required is None else required}
    if not extra:
        out["additionalProperties"] = False
    return out


STR: S = {"type": "string"}
INT: S = {"type": "integer"}
BOOL: S = {"type": "boolean"}
TIME: S = {"type": "string", "format": "date-time", "description": "ISO 8601, UTC, with Z"}


def nullable(schema: S) -> S:
    return {"anyOf": [schema, {"type": "null"}]}


def any_case(values: list[str]) -> S:
    """A case-insensitive enum, spelled as the three usual cases (the API accepts any case)."""
    spelled = [*values, *(v.capitalize() for v in values), *(v.upper() for v in values)]
    return {"type": "string", "enum": list(dict.fromkeys(spelled))}


TAG_LIMITS = ["elements", "valueSize", "sequenceItems", "sequenceDepth", "readBytes", "walkedElements", "unreadable"]

QUEUE = obj({k: {"type": "integer", "minimum": 0} for k in (*STATES, "checkedOut")})

ITEM_PROPS: S = {
    "id": INT,
    "state": {"type": "string", "enum": STATES},
    "checkedOut": BOOL,
    "sourceAeTitle": STR,
    "destinationAeTitle": STR,
    "destinationRole": STR,
    "studyInstanceUid": STR,
    "seriesInstanceUid": STR,
    "sopInstanceUid": STR,
    "sopClassUid": STR,
    "modality": STR,
    "patientId": STR,
    "patientName": {**nullable(STR), "description": "null without a credential while one is configured"},
    "accessionNumber": STR,
    "transferSyntaxUid": {"type": "string", "description": "the syntax the item is sent in (its prepared copy's when it has one)"},
    "receivedTransferSyntaxUid": {"type": "string", "description": "the syntax the instance was received in"},
    "sizeBytes": INT,
    "attemptCount": INT,
    "lastError": nullable(STR),
    "nextAttemptAt": nullable(TIME),
    "createdAt": TIME,
    "updatedAt": TIME,
}

SCHEMAS: S = {
    "Error": obj({"code": {"type": "string", "enum": CODES}, "message": STR}),
    "ErrorEnvelope": obj(
        {"ok": {"const": False}, "data": {"type": "null"}, "error": ref("Error"), "timestamp": TIME}
    ),
    "QueueCounts": QUEUE,
    "Node": obj(
        {
            "aeTitle": STR,
            "hostName": STR,
            "port": INT,
            "role": {"type": "string", "enum": list(NODE_ROLES)},
            "aliases": {"type": "array", "items": STR},
            "priority": INT,
            "processDelay": nullable(INT),
            "impersonate": BOOL,
            "transferSyntax": STR,
            "batchSize": nullable(INT),
            "minimumLineSpeed": nullable(INT),
            "stallThreshold": nullable(INT),
            "processSchedule": {"type": "array", "items": STR},
            "sopClassPriorities": nullable({"type": "array", "items": STR}),
            "queue": ref("QueueCounts"),
            "paused": BOOL,
            "scheduleOverride": BOOL,
            "inWindow": BOOL,
            "status": {
                "type": "string",
                "description": "the node actor: running, restarting, failed, stopped; none for nodes without a queue",
            },
            "activity": STR,
            "lastError": nullable(STR),
            "lastDeliveredAt": nullable(TIME),
            "restarts": {"type": "integer", "minimum": 0},
            "sendRate": {"type": "number", "minimum": 0, "description": "instances delivered per second over the last minute"},
            "oldestWaitingAt": {**nullable(TIME), "description": "arrival of the oldest item waiting (new, prepared, failed)"},
            "oldestWaitingSeconds": {**nullable({"type": "integer", "minimum": 0}), "description": "its age"},
        }
    ),
    "NodeUpdate": {
        **obj(
            {
                "role": {"type": "string", "enum": list(NODE_ROLES)},
                "aeTitle": {"type": "string", "description": "optional; must equal the path's AE title"},
                "hostName": STR,
                "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                "priority": {"type": "integer", "minimum": 0, "maximum": 2},
                "processDelay": nullable({"type": "integer", "minimum": 0}),
                "impersonate": BOOL,
                "transferSyntax": nullable(STR),
                "batchSize": nullable({"type": "integer", "minimum": 0}),
                "minimumLineSpeed": nullable({"type": "integer", "minimum": 0}),
                "stallThreshold": nullable({"type": "integer", "minimum": 0}),
                "processSchedule": nullable({"type": "array", "items": STR}),
                "sopClassPriorities": nullable({"type": "array", "items": STR}),
                "aliases": nullable({"type": "array", "items": STR}),
            },
            required=["role"],
        ),
        "description": "Fields left out keep their value; null clears an override (inherit the global value). "
        "Validated like nodes.yml.",
    },
    "EchoResult": obj({"success": BOOL, "latencyMs": nullable({"type": "number"}), "error": nullable(STR)}),
    "Item": obj(ITEM_PROPS),
    "ItemDetail": obj(
        {
            **ITEM_PROPS,
            "tags": nullable(
                {
                    "type": "object",
                    "description": "the header in the DICOM JSON model (PS3.18 F.2), up to the pixel data, "
                    "bulk data left out, cut to the limits tagsLimits names; null when the file cannot be read "
                    "or its SOP Instance UID is not the item's",
                }
            ),
            "tagsTruncated": {**BOOL, "description": "true when tags leaves out more than bulk data"},
            "tagsLimits": {
                "type": "array",
                "items": {"type": "string", "enum": TAG_LIMITS},
                "description": "the limits that cut tags: elements (2000 shown), valueSize (1024 bytes: "
                "a longer text is cut, a longer binary value left out), sequenceItems (100 per sequence), "
                "sequenceDepth (8), readBytes (16 MiB read or inflated), walkedElements (100,000 passed), "
                "unreadable (an encoding not read, shown up to there)",
            },
        }
    ),
    "ItemPage": obj(
        {"items": {"type": "array", "items": ref("Item")}, "total": INT, "skip": INT, "limit": INT}
    ),
    "Deleted": obj({"id": INT, "deleted": {"const": True}}),
    "Count": obj({"count": {"type": "integer", "minimum": 0}}),
    "TargetState": obj({"targetState": {**any_case(STATES), "description": "any case"}}),
    "BulkFilter": obj(
        {"source": nullable(STR), "destination": nullable(STR), "modality": nullable(STR)}, required=[]
    ),
    "Filters": obj({
        "filters": {"type": "array", "items": STR, "description": "the chain as config.yml's filters names it"},
        "dropUnfilteredInstances": BOOL,
        "off": {"type": "array", "items": STR, "description": "filters named whose file is missing"},
        "files": {"type": "array", "items": {"type": "object"}, "description": "each filter on: its file and entries"},
    }),
    "FilterTest": obj({"destinations": {"type": "array", "items": ref("FilterTrial")}}),
    "FilterTrial": obj({
        "destination": STR,
        "verdict": {"type": "string", "enum": ["kept", "changed", "dropped", "retry", "failed"]},
        "addDestinations": {"type": "array", "items": STR},
        "savedFiles": {"type": "array", "items": STR},
        "changes": {"type": "array", "items": obj({"tag": STR, "keyword": STR, "before": nullable(STR), "after": nullable(STR)})},
        "sortKey": nullable(STR),
        "message": STR,
        "decisions": {"type": "array", "items": STR},
    }),
    "ReloadReport": obj({
        "added": {"type": "array", "items": STR},
        "removed": {"type": "array", "items": STR},
        "changed": {"type": "array", "items": STR},
        "configChanged": {"type": "array", "items": STR},
        "needsRestart": {"type": "array", "items": STR},
    }),
    "ServiceFlags": obj({"storageScu": BOOL, "worklistScu": BOOL, "storageCommitScu": BOOL, "prepare": BOOL}),
    "ProcessingStatus": obj(
        {
            "allPaused": BOOL,
            "checkedOutItems": INT,
            "activeJobs": INT,
            "idle": BOOL,
            "nodes": {
                "type": "array",
                "items": obj({"aeTitle": STR, "role": STR, "paused": BOOL, "status": STR}),
            },
        }
    ),
    "ByState": obj({s: INT for s in STATES}),
    "Metrics": obj(
        {
            "totalItems": INT,
            "byState": ref("ByState"),
            "checkedOut": INT,
            "received": INT,
            "service": ref("ServiceFlags"),
            "loop": ref("LoopLag"),
            "transcoding": {
                "type": "object",
                "description": "per Storage node (by AE title), since the router started: its prepared copies converted into its TransferSyntax, and the instances converted on the way out (the destination accepted none of their stored syntaxes)",
                "additionalProperties": ref("Conversions"),
            },
        }
    ),
    "Conversions": obj(
        {
            "conversions": INT,
            "failed": {"type": "integer", "minimum": 0, "description": "instances that could not be converted (sent as received)"},
            "seconds": {"type": "number", "minimum": 0, "description": "time the conversions took (write, convert, read back)"},
            "onSend": {"type": "integer", "minimum": 0, "description": "instances delivered converted on the way out"},
            "onSendFailed": {"type": "integer", "minimum": 0, "description": "instances rejected because their conversion on the way out failed"},
        }
    ),
    "LoopLag": obj(
        {
            "maxStallMs": {"type": "number", "minimum": 0, "description": "the longest the event loop was held since start (ms); 0 when not measured"},
            "stallsOver100ms": {"type": "integer", "minimum": 0, "description": "stalls over 100 ms since start"},
        }
    ),
    "LogEntry": obj({"timestamp": TIME, "level": {"type": "string", "enum": ["DEBUG", "INFO", "WARN", "ERROR"]}, "message": STR, "logger": STR}),
    "SystemInfo": obj(
        {
            "product": STR,
            "version": STR,
            "startedAt": TIME,
            "uptimeSeconds": {"type": "integer", "minimum": 0},
            "aeTitle": STR,
            "activationState": STR,
        }
    ),
    "Login": obj({"password": STR}),
    "Session": obj({"authenticated": BOOL, "csrfToken": STR}, required=["authenticated"]),
    "SessionState": obj(
        {"authenticated": BOOL, "loginEnabled": BOOL, "authRequired": BOOL, "csrfToken": nullable(STR)}
    ),
    "Settings": obj(
        {
            "config": {"type": "object", "description": "the configuration in force, config.yml's keys; secrets shown as \"<redacted>\""},
            "nodesYml": nullable(STR),
            "filterFiles": {"type": "array", "items": obj({"name": STR, "text": nullable(STR)})},
        }
    ),
    "QueueStats": obj({"total": INT, "byState": ref("ByState"), "checkedOut": INT}),
    "Health": obj({"status": {"const": "ok"}, "timestamp": TIME}),
}

ERROR_TEXT = {
    400: "BAD_REQUEST: invalid JSON, unknown field, wrong type, unknown state, bad paging",
    403: "FORBIDDEN: missing or wrong credentials",
    404: "NOT_FOUND",
    409: "CONFLICT: the node or item is in a state that forbids it, or nodes.yml changed on disk",
    500: "INTERNAL: a file the change needed could not be written; nothing was changed",
    415: "BAD_REQUEST: a body whose Content-Type is not application/json",
    429: "TOO_MANY_REQUESTS: too many wrong passwords or bearer tokens from this address; wait Retry-After seconds",
    503: "UNAVAILABLE: a node actor is restarting or did not answer in time",
}


def envelope(data: S) -> S:
    return obj({"ok": {"const": True}, "data": data, "error": {"type": "null"}, "timestamp": TIME})


def json_content(schema: S) -> S:
    return {"application/json": {"schema": schema}}


AE_PARAM: S = {"name": "aeTitle", "in": "path", "required": True, "schema": STR}
ROLE_PARAM: S = {
    "name": "role",
    "in": "query",
    "required": False,
    "description": "which node when several share the AE title (default: the Storage node)",
    "schema": {"type": "string", "enum": list(NODE_ROLES)},
}
ID_PARAM: S = {"name": "id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 0}}


def uid_param(name: str) -> S:
    return {"name": name, "in": "path", "required": True, "schema": STR}


def op(
    summary: str,
    data: S | None,
    *,
    errors: tuple[int, ...] = (),
    write: bool = False,
    params: list[S] | None = None,
    body: S | None = None,
    body_required: bool = True,
    raw: bool = False,
    tag: str = "",
) -> S:
    responses: S = {}
    if data is not None:
        responses["200"] = {"description": "OK", "content": json_content(data if raw else envelope(data))}
    codes = set(errors) | ({403, 429} if write else set()) | ({400, 415} if body is not None else set())
    for code in sorted(codes):
        responses[str(code)] = {"description": ERROR_TEXT[code], "content": json_content(ref("ErrorEnvelope"))}
    out: S = {"summary": summary + (" 🔒" if write else ""), "responses": responses}
    if tag:
        out["tags"] = [tag]
    if params:
        out["parameters"] = params
    if body is not None:
        out["requestBody"] = {"required": body_required, "content": json_content(body)}
    if write:
        out["security"] = [{"bearerAuth": []}, {"cookieAuth": []}]
    return out


def q(name: str, schema: S, description: str = "") -> S:
    out: S = {"name": name, "in": "query", "required": False, "schema": schema}
    if description:
        out["description"] = description
    return out


NODE_PARAMS = [AE_PARAM, ROLE_PARAM]


def paths() -> S:
    """Every path of the API, in the order the document lists them."""
    return {
        **_system_paths(),
        **_node_paths(),
        **_queue_paths(),
        **_service_paths(),
        **_compat_paths(),
        **_item_action_paths(),
    }


def _system_paths() -> S:
    """This document, logging in and out, the system information."""
    return {
        "/api/openapi.json": {"get": op("This document", {"type": "object"}, raw=True, tag="System")},
        "/api/auth/login": {
            "post": op("Log in with api.servicePassword; sets the capacitor_session cookie", ref("Session"),
                       errors=(403, 429), body=ref("Login"), tag="Auth")
        },
        "/api/auth/logout": {
            "post": op("End the session of the capacitor_session cookie (a live one only with its X-CSRF-Token)",
                       ref("Session"), errors=(403,), tag="Auth")
        },
        "/api/auth/session": {
            "get": op("Whether the capacitor_session cookie names a live session, and its CSRF token "
                      "(X-CSRF-Token, needed by every write made with the cookie)", ref("SessionState"), tag="Auth")
        },
        "/api/config": {
            "get": op("The configuration in force (secrets redacted), nodes.yml and the filter files, read-only",
                      ref("Settings"), write=True, tag="System")
        },
        "/api/system/info": {"get": op("Version, uptime, AE title and activation state", ref("SystemInfo"), tag="System")},
    }


def _node_paths() -> S:
    """The nodes: list, read, edit, pause, resume, echo, schedule override."""
    return {
        "/api/nodes": {"get": op("All configured nodes with queue depth", {"type": "array", "items": ref("Node")}, tag="Nodes")},
        "/api/nodes/{aeTitle}": {
            "get": op("One node", ref("Node"), errors=(400, 404), params=NODE_PARAMS, tag="Nodes"),
            "put": op(
                "Update a node (paused, nothing checked out); edited in nodes.yml as it is on disk", ref("Node"),
                errors=(400, 404, 409, 500, 503), write=True, params=NODE_PARAMS, body=ref("NodeUpdate"), tag="Nodes",
            ),
        },
        "/api/nodes/{aeTitle}/pause": {
            "post": op("Pause delivery for one node", ref("Node"), errors=(400, 404, 409, 503), write=True, params=NODE_PARAMS, tag="Nodes")
        },
        "/api/nodes/{aeTitle}/resume": {
            "post": op("Resume delivery (restarts a failed node actor)", ref("Node"), errors=(400, 404, 409, 503), write=True, params=NODE_PARAMS, tag="Nodes")
        },
        "/api/nodes/{aeTitle}/echo": {
            "post": op("C-ECHO the node (10 s timeout)", ref("EchoResult"), errors=(400, 404, 503), write=True, params=NODE_PARAMS, tag="Nodes")
        },
        "/api/nodes/{aeTitle}/override-schedule": {
            "post": op("Override the ProcessSchedule (in memory)", ref("Node"), errors=(400, 404, 409, 503), write=True, params=NODE_PARAMS, tag="Nodes"),
            "delete": op("Clear the schedule override", ref("Node"), errors=(400, 404, 409, 503), write=True, params=NODE_PARAMS, tag="Nodes"),
        },
    }


def _queue_paths() -> S:
    """The queue: items, one item, and the bulk actions on items, studies and series."""
    return {
        "/api/queue/items": {
            "get": op(
                "A page of queue items (filters combine with AND)", ref("ItemPage"), errors=(400,),
                params=[
                    q("state", any_case(STATES), "any case"),
                    q("source", STR, "source AE title"),
                    q("dest", STR, "destination AE title"),
                    q("modality", STR),
                    q("search", STR, "substring of UIDs, AE titles, accession number, patient ID"),
                    q("skip", {"type": "integer", "minimum": 0, "default": 0}),
                    q("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}),
                    q("order", {"type": "string", "enum": ["oldest", "newest"], "default": "oldest"},
                      "by arrival: oldest first (the default) or newest first"),
                ],
                tag="Queue",
            )
        },
        "/api/queue/items/{id}": {
            "get": op("One item with its DICOM tags", ref("ItemDetail"), errors=(400, 404), params=[ID_PARAM], tag="Queue"),
            "delete": op(
                "Delete the item (and its file when no other item needs it)", ref("Deleted"),
                errors=(400, 404, 409, 503), write=True, params=[ID_PARAM], tag="Queue",
            ),
        },
        "/api/queue/items/{id}/move": {
            "post": op("Move the item to a state", ref("Item"), errors=(400, 404, 409, 503), write=True,
                       params=[ID_PARAM], body=ref("TargetState"), tag="Queue")
        },
        "/api/queue/actions/retry-failed": {
            "post": op("Retry every failed item matching the filters", ref("Count"), errors=(503,), write=True,
                       body=ref("BulkFilter"), body_required=False, tag="Queue")
        },
        "/api/queue/actions/retry-rejected": {
            "post": op("Retry every rejected item matching the filters", ref("Count"), errors=(503,), write=True,
                       body=ref("BulkFilter"), body_required=False, tag="Queue")
        },
        "/api/queue/studies/{studyUid}/move": {
            "post": op("Move every item of a study to a state", ref("Count"), errors=(404, 503), write=True,
                       params=[uid_param("studyUid")], body=ref("TargetState"), tag="Queue")
        },
        "/api/queue/studies/{studyUid}": {
            "delete": op("Delete every item of a study", ref("Count"), errors=(404, 503), write=True,
                         params=[uid_param("studyUid")], tag="Queue")
        },
        "/api/queue/series/{seriesUid}/move": {
            "post": op("Move every item of a series to a state", ref("Count"), errors=(404, 503), write=True,
                       params=[uid_param("seriesUid")], body=ref("TargetState"), tag="Queue")
        },
    }


def _service_paths() -> S:
    """The processing flags, the reload, the processing status, metrics and logs."""
    return {
        "/api/service/status": {"get": op("Processing flags", ref("ServiceFlags"), tag="Service")},
        "/api/service/pause": {"post": op("Disable all processing (receiving continues)", ref("ServiceFlags"), write=True, tag="Service")},
        "/api/service/resume": {"post": op("Re-enable all processing", ref("ServiceFlags"), write=True, tag="Service")},
        **_filter_paths(),
        "/api/config/reload": {"post": op("Re-read config.yml and nodes.yml; apply node additions, removals and edits and the reloadable keys, or change nothing", ref("ReloadReport"), errors=(400, 409), write=True, tag="Service")},
        "/api/service/processing-status": {"get": op("Pause state, checked-out items, active jobs, idle", ref("ProcessingStatus"), tag="Service")},
        "/api/metrics": {"get": op("Aggregate queue statistics and service status", ref("Metrics"), tag="Metrics")},
        "/metrics": {
            "get": {
                "summary": "The same counters in the Prometheus text exposition format (docs/operations.md)",
                "tags": ["Metrics"],
                "responses": {"200": {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}},
            }
        },
        "/api/logs/recent": {
            "get": op(
                "Recent log entries (oldest first)", {"type": "array", "items": ref("LogEntry")}, errors=(400,),
                params=[
                    q("lines", {"type": "integer", "minimum": 1, "default": 100}, "at most 1000 are returned"),
                    q("level", {"type": "string", "enum": ["DEBUG", "INFO", "WARN", "WARNING", "ERROR"]}, "this level and above; any case"),
                ],
                tag="Logs",
            )
        },
    }


def _filter_paths() -> S:
    """The filter chain: what is loaded, a trial run on a file, a reload of the files."""
    trial = op(
        "Run the filter chain in force on a DICOM file for ?dest= (and each destination a route adds); "
        "nothing is written (save_file targets are reported, anonymize uses a throwaway mapping)",
        ref("FilterTest"), errors=(400,), write=True, tag="Filters",
        params=[
            {"name": "dest", "in": "query", "required": True, "schema": STR, "description": "the destination node's AE title"},
            q("source", STR, "the calling AE title the file came from"),
        ],
    )
    trial["requestBody"] = {
        "required": True,
        "content": {"application/dicom": {"schema": {"type": "string", "format": "binary"}}},
    }
    return {
        "/api/filters": {"get": op("The filter chain in force and each filter file's entries (read-only)", ref("Filters"), tag="Filters")},
        "/api/filters/test": {"post": trial},
        "/api/filters/reload": {
            "post": op(
                "Re-read the filter files; all are checked before the new chain is put in force, else 400 with the "
                "first error and the chain in force stays", ref("Filters"), errors=(400,), write=True, tag="Filters",
            )
        },
    }


def _compat_paths() -> S:
    """Capacitor's backward-compatible endpoints (no envelope)."""
    return {
        "/api/queue/stats": {"get": op("Queue statistics (backward compatible: no envelope)", ref("QueueStats"), raw=True, tag="Queue")},
        "/api/queue/health": {"get": op("Health (backward compatible: no envelope)", ref("Health"), raw=True, tag="Queue")},
    }


def _item_action_paths() -> S:
    """The state changes of one item (fail, reject, retry)."""
    item_ops = {
        "fail": "Move the item to failed (retried on the next cycle)",
        "reject": "Move the item to rejected (not retried)",
        "retry": "Move a failed or rejected item back to new",
    }
    return {
        f"/api/queue/items/{{id}}/{action}": {
            "post": op(summary, ref("Item"), errors=(400, 404, 409, 503), write=True, params=[ID_PARAM], tag="Queue")
        }
        for action, summary in item_ops.items()
    }


def build() -> S:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "capacitor-trio management API",
            "version": "1",
            "description": "DICOM Capacitor compatible HTTP API, served on 127.0.0.1 only. Every response "
            "but /api/queue/stats and /api/queue/health is an envelope {ok, data, error, timestamp}. "
            "Write endpoints (🔒) need a bearer token (api.token) or the capacitor_session cookie "
            "from /api/auth/login with its session's X-CSRF-Token header, unless neither api.token "
            "nor api.servicePassword is set; reads without either show no patient names. Unknown "
            "paths answer 404 and unknown methods 405, in the envelope.",
        },
        "servers": [{"url": "http://127.0.0.1:1080"}],
        "paths": paths(),
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer"},
                "cookieAuth": {"type": "apiKey", "in": "cookie", "name": "capacitor_session"},
            },
        },
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    print(render(), end="")
