"""The wire format: OpenAI-shaped requests, responses and errors, and the pure functions that build them.

Requests are parsed into frozen pydantic models that forbid unknown fields, so a typo in a field name is a
422 naming the field rather than a silently ignored option. Every error leaves the server in OpenAI's shape,
{"error": {"message", "type", "param", "code"}}, whatever raised it.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

# ------------------------------------------------------------------------------------------------ errors


class ApiError(Exception):
    """A request the server refuses, with the HTTP status and the fields of OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code or _DEFAULT_CODES.get(status, "invalid_request")
        self.headers: dict[str, str] = {}

    @property
    def type(self) -> str:
        return _ERROR_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_ERROR_TYPES = {401: "authentication_error", 429: "rate_limit_error", 503: "server_error"}
_DEFAULT_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    422: "invalid_type",
    429: "server_overloaded",
    500: "internal_error",
}


def validation_error(errors: Sequence[dict[str, Any]]) -> ApiError:
    """A pydantic/FastAPI validation failure as one ApiError: 400 for a body that is not JSON, 422 otherwise."""
    first = errors[0]
    loc = [part for part in first.get("loc", ()) if not _is_union_tag(part)]
    if loc and loc[0] == "body":
        loc = loc[1:]
    param = _format_path(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {first.get('msg', '')}", code="invalid_json")
    if kind == "extra_forbidden":
        return ApiError(422, f"unknown field '{param}'", param=param, code="unknown_field")
    if kind == "missing":
        return ApiError(422, f"'{param}' is required", param=param, code="missing_field")
    message = first.get("msg", "invalid value")
    # A union (e.g. input: string | list of strings) reports one error per branch; one clear line is enough.
    expected = " or ".join(sorted({_expected(error) for error in errors if _same_field(error, first)}))
    if expected:
        message = f"expected {expected}"
    return ApiError(422, f"'{param}': {message}" if param else message, param=param, code="invalid_type")


def _expected(error: dict[str, Any]) -> str:
    return _TYPE_WORDS.get(error.get("type", ""), "")


_TYPE_WORDS = {
    "string_type": "a string",
    "list_type": "a list",
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "model_attributes_type": "a JSON object",
    "dict_type": "a JSON object",
}


def _same_field(error: dict[str, Any], first: dict[str, Any]) -> bool:
    strip = lambda loc: [part for part in loc if not _is_union_tag(part)][:2]  # noqa: E731
    return strip(error.get("loc", ())) == strip(first.get("loc", ()))


def _is_union_tag(part: Any) -> bool:
    # pydantic names the branch of a union it tried ("str", "list[str]") inside the location
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool", "none"})


def _format_path(loc: Sequence[Any]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


# ---------------------------------------------------------------------------------------------- requests


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InstructionFields(_Request):
    """The paper phrases every input as a request to answer: a named prompt of the model, or free text."""

    instruction: StrictStr | None = None
    prompt_name: StrictStr | None = None
    truncate: StrictBool = False  # cut inputs to the token limit instead of refusing them with 413


class EmbeddingRequest(InstructionFields):
    """POST /v1/embeddings, as OpenAI's, plus instruction, prompt_name, truncate, normalize and include_states."""

    input: StrictStr | list[StrictStr]
    model: StrictStr | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(None, ge=1)
    user: StrictStr | None = None
    normalize: StrictBool = True
    include_states: StrictBool = False  # also return z (C x H), which POST /v1/decode turns back into text


class DecodeRequest(InstructionFields):
    """POST /v1/decode: texts (compressed first) or one embedding's compression states z (C x H)."""

    input: StrictStr | list[StrictStr] | None = None
    z: list[list[StrictFloat]] | None = None
    model: StrictStr | None = None
    max_new_tokens: StrictInt | None = Field(None, ge=1)  # default: the server's max_decode_tokens


def input_texts(value: str | list[str]) -> list[str]:
    """`input` as a list; an empty list or an empty (or blank) string is a 400 naming the index."""
    texts = [value] if isinstance(value, str) else list(value)
    if not texts:
        raise ApiError(400, "'input' is an empty list", param="input", code="empty_input")
    for index, text in enumerate(texts):
        if not text.strip():
            where = "input" if isinstance(value, str) else f"input[{index}]"
            raise ApiError(400, f"'{where}' is empty", param=where, code="empty_input")
    return texts


# --------------------------------------------------------------------------------------------- responses


def shape_embedding(vector: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:
    """Matryoshka-style: keep the first `dimensions` values, then L2-normalise (when asked) what is kept."""
    kept = np.asarray(vector, dtype=np.float32)[:dimensions] if dimensions else np.asarray(vector, dtype=np.float32)
    if normalize:
        norm = float(np.linalg.norm(kept))
        kept = kept / max(norm, 1e-12)  # the same floor as torch.nn.functional.normalize
    return kept.astype(np.float32)


def encode_base64(vector: np.ndarray) -> str:
    """OpenAI's `encoding_format: base64`: the little-endian float32 bytes of the vector, base64-encoded."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def decode_base64(text: str) -> np.ndarray:
    """The inverse of encode_base64 (what a client does with a base64 embedding)."""
    return np.frombuffer(base64.b64decode(text), dtype="<f4")


def embedding_item(vector: np.ndarray, index: int, encoding_format: str) -> dict[str, Any]:
    embedding = encode_base64(vector) if encoding_format == "base64" else vector.tolist()
    return {"object": "embedding", "embedding": embedding, "index": index}


def usage(prompt_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
