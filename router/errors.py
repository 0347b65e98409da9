"""OpenAI-format errors: {"error": {"message", "type", "param", "code"}} for every failure.

`OpenAIError` is raised anywhere in request handling; the handlers installed by
`install_error_handlers` turn it, FastAPI/Starlette HTTP errors, validation errors and anything
unexpected into that body, with 422 turned into 400 as OpenAI clients expect.
"""

from __future__ import annotations

import logging
import re
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from zipserve.router.schemas import ErrorDetail, ErrorResponse

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class OpenAIError(Exception):
    """An error to return to the client as an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(
            status, "invalid_request_error" if status < 500 else "server_error"
        )
        self.headers = headers

    def detail(self) -> ErrorDetail:
        return ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(
            ErrorResponse(error=self.detail()).model_dump(),
            status_code=self.status,
            headers=self.headers,
        )


_FIELD = re.compile(r"([A-Za-z_][\w.\[\]]*):")


def backend_error(
    message: str | None, headers: dict[str, str] | None = None, *, client_error: bool = False
) -> OpenAIError:
    """A backend `finish` with reason "error": 400 naming the field when the backend refused a
    value of the request (`client_error`), 504 for the request timeout, 503 if it reads like
    overload, else 500."""
    message = message or "the backend failed without a message"
    if client_error:
        m = _FIELD.match(message)
        return OpenAIError(
            400, message, param=m.group(1) if m else None, code="invalid_value", headers=headers
        )
    if message.startswith("timeout:"):
        return OpenAIError(504, message, code="request_timeout", headers=headers)
    if re.search(r"overload|unavailable", message, re.IGNORECASE):
        return OpenAIError(503, message, code="backend_unavailable", headers=headers)
    return OpenAIError(500, message, code="backend_error", headers=headers)


def _param(loc: tuple[Any, ...]) -> str | None:
    """('messages', 0, 'content') -> 'messages[0].content'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or None


def validation_error(errors: list[dict[str, Any]]) -> OpenAIError:
    """The first pydantic error as a 400 naming its field."""
    if not errors:
        return OpenAIError(400, "invalid request")
    err = errors[0]
    loc = tuple(err.get("loc", ()))
    if loc and loc[0] in ("body", "query", "path", "header"):
        loc = loc[1:]
    param = _param(loc)
    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    if err.get("type") == "missing":
        msg = "is required"
    elif err.get("type") == "model_type" and not loc:
        return OpenAIError(400, "the request body must be a JSON object")
    extra = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return OpenAIError(400, f"{param}: {msg}{extra}" if param else f"{msg}{extra}", param=param)


def parse_model(model: type[M], data: Any) -> M:
    """Validate `data` (parsed JSON) into `model`, raising a 400 OpenAIError on failure."""
    if not isinstance(data, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error([dict(err) for err in e.errors(include_url=False)]) from None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error([dict(err) for err in exc.errors()]).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return OpenAIError(
            exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)
        ).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        message = f"internal error ({type(exc).__name__}); see the router log"
        return OpenAIError(500, message).response()
