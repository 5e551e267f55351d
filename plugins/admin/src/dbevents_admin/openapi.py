"""The OpenAPI 3.1 document served at /openapi.json."""

from __future__ import annotations

from typing import Any

_FILTERS = [
    ("trigger", "the trigger's name"), ("status", "pending, delivering, delivered or failed"),
    ("table", "the table or collection"), ("docId", "the row's key"),
    ("database", "the [databases.NAME] it came from"),
    ("since", "created at or after this ISO 8601 time"),
    ("until", "created before this ISO 8601 time"),
]


def _param(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": schema or {"type": "string"}}


def _ok(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"200": {"description": description,
                    "content": {"application/json": {"schema": schema}}},
            "401": {"description": "no valid bearer token"}}


_OBJ: dict[str, Any] = {"type": "object"}
_FILTER_BODY = {"type": "object", "properties": {
    "ids": {"type": "array", "items": {"type": "string"}},
    **{n: {"type": "string", "description": d} for n, d in _FILTERS}}}


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "dbevents admin API", "version": "1"},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {"get": {
                "summary": "Liveness; needs no token", "security": [],
                "responses": {"200": {"description": '{"status": "ok"}'}}}},
            "/readyz": {"get": {
                "summary": "Readiness: the store answers and every source streams; needs "
                           "no token",
                "security": [],
                "responses": {"200": {"description": '{"status": "ready"}'},
                              "503": {"description": '{"status": "not ready", "not_ready": '
                                                     '{part: why}}'}}}},
            "/metrics": {"get": {
                "summary": "Prometheus text format (no token with admin.metrics_public)",
                "responses": {"200": {"description": "text/plain; version=0.0.4"}}}},
            "/api/triggers": {"get": {
                "summary": "Triggers with their settings, counts by status and last delivery",
                "responses": _ok("triggers", _OBJ)}},
            "/api/sources": {"get": {
                "summary": "Databases with their type and checkpoint",
                "responses": _ok("sources", _OBJ)}},
            "/api/events": {"get": {
                "summary": "Events, newest first, filtered and paged by cursor",
                "parameters": [*(_param(n, d) for n, d in _FILTERS),
                               _param("limit", "1 to 500, default 50", {"type": "integer"}),
                               _param("cursor", "next_cursor of the previous page")],
                "responses": _ok("a page: events and next_cursor (null on the last page)",
                                 _OBJ)}},
            "/api/events/{id}": {"get": {
                "summary": "One event: payload and every attempt (request headers and the "
                           "exact body sent, response status and body)",
                "parameters": [{"name": "id", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": {**_ok("the event", _OBJ), "404": {"description": "no such event"}}}},
            "/api/events/{id}/redeliver": {"post": {
                "summary": "Redeliver one event (back to pending, attempts reset)",
                "parameters": [{"name": "id", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": _ok('{"redelivered": n}', _OBJ)}},
            "/api/events/redeliver": {"post": {
                "summary": "Redeliver events by ids, or all matching a filter whose status is "
                           "failed or delivered",
                "requestBody": {"content": {"application/json": {"schema": _FILTER_BODY}}},
                "responses": _ok('{"redelivered": n}', _OBJ)}},
            "/api/events/purge": {"post": {
                "summary": "Delete finished events (and their attempts) last updated before a "
                           "time",
                "requestBody": {"content": {"application/json": {"schema": {
                    "type": "object", "required": ["before"], "properties": {
                        "before": {"type": "string", "format": "date-time"},
                        "status": {"type": "array", "items": {
                            "enum": ["delivered", "failed"]}},
                        "trigger": {"type": "string"}}}}}},
                "responses": _ok('{"purged": n}', _OBJ)}},
        },
    }
