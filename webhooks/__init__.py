"""Webhooks for async jobs: which callback URLs are allowed (policy.py) and signed delivery with retries (sender.py)."""

from webhooks.policy import CallbackPolicy, UnsupportedCallbackUrl
from webhooks.sender import DeliveryState, WebhookSender, check_secret

__all__ = ["CallbackPolicy", "DeliveryState", "UnsupportedCallbackUrl", "WebhookSender", "check_secret"]
