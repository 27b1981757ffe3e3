"""A logging filter that blanks configured secrets out of every record, whoever logs them."""

from __future__ import annotations

import logging

REDACTED = "[redacted]"


class SecretRedactor(logging.Filter):
    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        message = record.getMessage()
        if any(secret in message for secret in self._secrets):
            for secret in self._secrets:
                message = message.replace(secret, REDACTED)
            record.msg, record.args = message, None
        return True


def install(secrets: list[str]) -> None:
    """On the root logger's handlers and on every handler added later through the root logger."""
    redactor = SecretRedactor(secrets)
    root = logging.getLogger()
    root.addFilter(redactor)
    for handler in root.handlers:
        handler.addFilter(redactor)
