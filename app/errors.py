"""The one error shape of the API, `{"error": {"type", "code", "message", "param"}}`, and its handlers."""

from __future__ import annotations

import difflib
import logging
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DataError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.storage import StorageFull

log = logging.getLogger("tuneyard.errors")

ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    500: "api_error",
    503: "service_unavailable_error",
    507: "insufficient_storage_error",
}
# How long a client should wait before retrying when the database is unreachable.
DATABASE_RETRY_AFTER_SECONDS = 5


class ErrorBody(BaseModel):
    type: str
    code: str
    message: str
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ApiError(Exception):
    """An error that reaches the client with a status, a stable code and the parameter at fault."""

    status_code = 400
    code = "invalid_request"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None,
                 status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.code
        self.param = param
        self.status_code = status_code or self.status_code


class Unauthorized(ApiError):
    status_code = 401
    code = "invalid_api_key"


class NotFound(ApiError):
    status_code = 404
    code = "not_found"


class Conflict(ApiError):
    status_code = 409
    code = "conflict"


class PayloadTooLarge(ApiError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(ApiError):
    status_code = 415
    code = "unsupported_media_type"


class Unprocessable(ApiError):
    status_code = 422
    code = "invalid_value"


class ServiceUnavailable(ApiError):
    status_code = 503
    code = "service_unavailable"


def error_payload(status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """Returns the JSON body of an error response."""
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"error": {"type": kind, "code": code, "message": message, "param": param}}


def error_response(status: int, code: str, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_payload(status, code, message, param), status_code=status, headers=headers)


# Declared on every route so the OpenAPI document (and schemathesis) knows the error shape.
def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """Returns a FastAPI `responses=` mapping declaring the error shape for the given statuses."""
    return {status: {"model": ErrorResponse, "description": ERROR_TYPES.get(status, "error")}
            for status in statuses}


# ---------------------------------------------------------------- validation error paths


def _unwrap(tp: Any) -> Any:
    while get_origin(tp) is typing.Annotated:
        tp = get_args(tp)[0]
    return tp


def _union_members(tp: Any) -> list[Any]:
    if get_origin(tp) in (Union, types.UnionType):
        return [_unwrap(a) for a in get_args(tp) if a is not type(None)]
    return []


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _tag_member(members: list[Any], tag: str) -> Any | None:
    """Returns the union member whose Literal discriminator field holds `tag`, if any."""
    for member in members:
        if not _is_model(member) or tag in member.model_fields:
            continue
        for field in member.model_fields.values():
            ann = _unwrap(field.annotation)
            if get_origin(ann) is Literal and tag in get_args(ann):
                return member
    return None


def _step(tp: Any, element: str | int) -> tuple[Any, bool]:
    """Walks one location element down a type; returns (next type, element is a union tag)."""
    tp = _unwrap(tp)
    members = _union_members(tp)
    if members:
        if isinstance(element, str):
            if not any(_is_model(m) and element in m.model_fields for m in members):
                tagged = _tag_member(members, element)
                if tagged is not None:
                    return tagged, True
        for member in members:
            nxt, is_tag = _step(member, element)
            if nxt is not None:
                return nxt, is_tag
        return None, False
    origin = get_origin(tp)
    if origin in (list, tuple, set, frozenset) and isinstance(element, int):
        args = get_args(tp)
        return (args[0] if args else None), False
    if origin is dict and isinstance(element, str):
        args = get_args(tp)
        return (args[1] if len(args) == 2 else None), False
    if _is_model(tp) and isinstance(element, str) and element in tp.model_fields:
        return tp.model_fields[element].annotation, False
    return None, False


def _without_source(loc: tuple[str | int, ...]) -> list[str | int]:
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    return parts


def unknown_field_hint(loc: tuple[str | int, ...], root: Any) -> str:
    """Returns " — did you mean `learning_rate`?" for an unknown field close to a real one, else ""."""
    parts = _without_source(loc)
    if not parts or root is None:
        return ""
    tp = root
    for element in parts[:-1]:
        tp, _ = _step(tp, element)
        if tp is None:
            return ""
    tp = _unwrap(tp)
    if not _is_model(tp):
        return ""
    close = difflib.get_close_matches(str(parts[-1]), list(tp.model_fields), n=1, cutoff=0.6)
    return f" — did you mean `{close[0]}`?" if close else ""


def loc_to_param(loc: tuple[str | int, ...], root: Any = None) -> str | None:
    """Returns a field path such as `stages[1].beta` from a pydantic error location.

    Pydantic puts the tag of a discriminated union into the location (`stages, 1, dpo, beta`);
    the root model's annotations tell tags from field names, so tags are dropped.
    """
    parts = _without_source(loc)
    tp = root
    out = ""
    for element in parts:
        is_tag = False
        if tp is not None:
            tp, is_tag = _step(tp, element)
        if is_tag:
            continue
        if isinstance(element, int):
            out += f"[{element}]"
        else:
            out += f".{element}" if out else str(element)
    return out or None


def _body_type(request: Request) -> Any:
    route = request.scope.get("route")
    field = getattr(route, "body_field", None)
    return getattr(getattr(field, "field_info", None), "annotation", None)


# ---------------------------------------------------------------- handlers


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status_code, exc.code, exc.message, exc.param)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if not errors:
        return error_response(422, "invalid_request", "the request is not valid")
    first = errors[0]
    loc, body = tuple(first.get("loc", ())), _body_type(request)
    param = loc_to_param(loc, body)
    message = str(first.get("msg", "invalid value"))
    if first.get("type") == "extra_forbidden":
        message = "unknown field" + unknown_field_hint(loc, body)
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return error_response(422, str(first.get("type", "invalid_value")), message, param)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    codes = {404: "not_found", 405: "method_not_allowed", 401: "invalid_api_key", 408: "request_timeout",
             413: "payload_too_large"}
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    return error_response(status, codes.get(status, "http_error"), message, headers=exc.headers)


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # Connection refused or dropped, a pool exhausted, SQLite locked: transient, and the pool's
    # pre-ping replaces dead connections, so the same request succeeds once the database is back.
    log.warning("database unavailable on %s %s: %s", request.method, request.url.path,
                type(exc).__name__)
    return error_response(503, "database_unavailable", "the database is unreachable; retry shortly",
                          headers={"Retry-After": str(DATABASE_RETRY_AFTER_SECONDS)})


async def _database_refused_value(request: Request, exc: Exception) -> JSONResponse:
    # A value the database cannot store (out of a column's range, an encoding it refuses): the
    # request's fault. The SQL and its parameters stay in the log, never in the answer.
    log.error("database refused a value on %s %s: %s", request.method, request.url.path, exc)
    return error_response(422, "invalid_value", "a value in the request is out of the range the service "
                          "can store; check the ids and numbers you sent")


async def _storage_full(request: Request, exc: Exception) -> JSONResponse:
    log.error("storage full on %s %s: %s", request.method, request.url.path, exc)
    return error_response(507, "storage_full", "the service's storage is full; nothing was stored, retry "
                          "later or contact the operator")


def install_error_handlers(app: FastAPI) -> None:
    """Registers the handlers that give every error the one shape.

    Unexpected exceptions are answered by the request-context middleware (app.observability),
    which logs them with the request id and still sets X-Request-ID on the 500.
    """
    app.add_exception_handler(ApiError, _api_error)
    for unavailable in (OperationalError, InterfaceError, PoolTimeout):
        app.add_exception_handler(unavailable, _database_unavailable)
    app.add_exception_handler(DataError, _database_refused_value)
    app.add_exception_handler(StorageFull, _storage_full)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
