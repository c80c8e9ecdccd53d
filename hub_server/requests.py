"""The one error a request handler raises: a code and a message for the peer."""

from __future__ import annotations


class RequestError(Exception):
    """A client or daemon asked for something invalid; ``code`` + message go back."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
