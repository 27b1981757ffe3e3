"""Webhooks: which callback URLs are accepted, and signed delivery with retries to a real receiver process."""

from __future__ import annotations

import asyncio
import base64
import uuid

import pytest
from pydantic import ValidationError
from served import free_port
from standardwebhooks import Webhook
from webhook_receiver import WebhookReceiver

from backend.settings import Settings
from webhooks import CallbackPolicy, DeliveryState, UnsupportedCallbackUrl, WebhookSender

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
PAYLOAD = {"task_id": "9b2f6c1e-0d7a-4c55-8a8e-2f4f1c3b7a10", "status": "completed", "result": {"note": "Ünïcode"}}


@pytest.fixture(scope="module")
def receiver(tmp_path_factory):
    started = WebhookReceiver(tmp_path_factory.mktemp("receiver")).start()
    yield started
    started.stop()


def sender(receiver_origin: str, **overrides) -> WebhookSender:
    """A sender built from the settings, as the service builds it, with a tiny backoff."""
    values = {"webhook_timeout_s": 1.0, "webhook_max_attempts": 3, "webhook_backoff_s": 0.01, **overrides}
    settings = Settings(webhook_allowed_origins=receiver_origin, webhook_secret=SECRET, **values, _env_file=None)
    return WebhookSender(
        settings.webhook_secret.get_secret_value(),
        settings.webhook_timeout_s,
        settings.webhook_max_attempts,
        settings.webhook_backoff_s,
    )


def deliver(webhook_sender: WebhookSender, url: str) -> tuple[DeliveryState, list[DeliveryState]]:
    """Delivers PAYLOAD once; returns the final state and the states on_attempt saw."""
    seen: list[DeliveryState] = []

    async def on_attempt(state: DeliveryState) -> None:
        seen.append(state)

    final = asyncio.run(webhook_sender.deliver(url, PAYLOAD, "msg_" + uuid.uuid4().hex, on_attempt))
    return final, seen


def unique(plan: str) -> str:
    return f"/{plan}/{uuid.uuid4().hex}"


def test_fails_twice_then_delivered_on_the_third_attempt_with_one_id_and_verifiable_signatures(receiver):
    path = unique("500,500,204")
    final, seen = deliver(sender(receiver.origin, webhook_max_attempts=5), receiver.url(path))

    assert [s.status for s in seen] == ["pending", "pending", "delivered"]
    assert [s.attempts for s in seen] == [1, 2, 3]
    assert [s.last_status_code for s in seen] == [500, 500, 204]
    assert final == seen[-1] and final.delivered_at is not None and final.last_error is None
    requests = receiver.requests(path)
    assert len(requests) == 3
    assert len({r["headers"]["webhook-id"] for r in requests}) == 1
    assert len({r["body"] for r in requests}) == 1  # byte-identical on every retry
    for request in requests:
        assert Webhook(SECRET).verify(request["body"], request["headers"]) == PAYLOAD
        assert request["headers"]["content-type"] == "application/json"


def test_a_forged_or_tampered_delivery_does_not_verify(receiver):
    path = unique("204")
    deliver(sender(receiver.origin), receiver.url(path))
    (request,) = receiver.requests(path)
    other_secret = "whsec_" + base64.b64encode(b"x" * 32).decode()
    with pytest.raises(Exception, match="signature"):
        Webhook(other_secret).verify(request["body"], request["headers"])
    with pytest.raises(Exception, match="signature"):
        Webhook(SECRET).verify(request["body"].replace(b"completed", b"failed"), request["headers"])


def test_always_500_fails_after_max_attempts(receiver):
    path = unique("500")
    final, seen = deliver(sender(receiver.origin, webhook_max_attempts=3), receiver.url(path))

    assert len(receiver.requests(path)) == 3
    assert [s.status for s in seen] == ["pending", "pending", "failed"]
    assert (final.status, final.attempts, final.last_status_code, final.last_error) == ("failed", 3, 500, "HTTP 500")
    assert final.delivered_at is None


@pytest.mark.parametrize("status", [400, 401, 404, 410, 422])
def test_other_4xx_fail_after_one_attempt(receiver, status):
    path = unique(f"{status},204")
    final, seen = deliver(sender(receiver.origin), receiver.url(path))

    assert len(receiver.requests(path)) == 1
    assert len(seen) == 1
    assert (final.status, final.attempts, final.last_status_code) == ("failed", 1, status)


@pytest.mark.parametrize("status", [408, 429, 502, 503, 504])
def test_408_429_and_5xx_are_retried(receiver, status):
    path = unique(f"{status},204")
    final, _ = deliver(sender(receiver.origin), receiver.url(path))

    assert len(receiver.requests(path)) == 2
    assert (final.status, final.attempts, final.last_status_code) == ("delivered", 2, 204)


def test_redirect_is_not_followed_and_fails(receiver):
    path = unique("302,204")
    final, _ = deliver(sender(receiver.origin), receiver.url(path))

    assert len(receiver.requests(path)) == 1
    assert receiver.requests("/redirected") == []
    assert (final.status, final.attempts, final.last_status_code) == ("failed", 1, 302)
    assert "redirect" in final.last_error


def test_a_timeout_is_retried(receiver):
    path = unique("sleep5,204")
    final, seen = deliver(sender(receiver.origin, webhook_timeout_s=0.5), receiver.url(path))

    assert len(receiver.requests(path)) == 2
    assert (seen[0].status, seen[0].last_status_code) == ("pending", None)
    assert "no response within 0.5 s" in seen[0].last_error
    assert (final.status, final.attempts, final.last_status_code) == ("delivered", 2, 204)


def test_retry_after_is_honoured(receiver):
    path = unique("429+1,204")
    final, _ = deliver(sender(receiver.origin), receiver.url(path))

    first, second = receiver.requests(path)
    assert second["at"] - first["at"] >= 1.0  # the backoff alone would be 0.01 s
    assert (final.status, final.attempts) == ("delivered", 2)


def test_connection_refused_is_retried_then_fails():
    origin = f"http://localhost:{free_port()}"
    final, seen = deliver(sender(origin, webhook_max_attempts=2), f"{origin}/hook")

    assert [s.status for s in seen] == ["pending", "failed"]
    assert (final.attempts, final.last_status_code) == (2, None)
    assert final.last_error.startswith("connection failed")


def test_message_id_must_not_be_able_to_confuse_the_signed_content():
    with pytest.raises(ValueError, match="message_id"):
        asyncio.run(sender("http://localhost:1").deliver("http://localhost:1/", PAYLOAD, "a.b"))


def test_delivery_state_is_the_status_body_webhook_object():
    assert DeliveryState(url="https://hooks.example.com/x").as_dict() == {
        "url": "https://hooks.example.com/x",
        "status": "pending",
        "attempts": 0,
        "last_status_code": None,
        "last_error": None,
        "delivered_at": None,
    }


POLICY = CallbackPolicy(["https://hooks.example.com", "http://localhost:8080"])


@pytest.mark.parametrize(
    ("url", "sent_to"),
    [
        ("https://hooks.example.com/sam3/done?key=1", "https://hooks.example.com/sam3/done?key=1"),
        ("HTTPS://Hooks.Example.COM:443/a", "https://hooks.example.com/a"),
        ("https://hooks.example.com", "https://hooks.example.com/"),
        ("http://localhost:8080/hook", "http://localhost:8080/hook"),
    ],
)
def test_accepted_callback_urls_are_normalised(url, sent_to):
    assert POLICY.check(url) == sent_to


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://evil.example.com/hook", "not in WEBHOOK_ALLOWED_ORIGINS"),
        ("https://hooks.example.com.evil.com/hook", "not in WEBHOOK_ALLOWED_ORIGINS"),
        ("https://hooks.example.com:8443/hook", "not in WEBHOOK_ALLOWED_ORIGINS"),
        ("http://localhost:8081/hook", "not in WEBHOOK_ALLOWED_ORIGINS"),
        ("http://localhost/hook", "not in WEBHOOK_ALLOWED_ORIGINS"),
        ("http://hooks.example.com/hook", "https"),
        ("https://127.0.0.1/hook", "IP addresses"),
        ("http://127.0.0.1:8080/hook", "IP addresses"),
        ("https://169.254.169.254/latest/meta-data/", "IP addresses"),
        ("https://[::1]/hook", "IP addresses"),
        ("http://[::ffff:127.0.0.1]:8080/hook", "IP addresses"),
        ("https://2130706433/hook", "IP addresses"),
        ("https://0x7f000001/hook", "IP addresses"),
        ("https://0177.0.0.1/hook", "IP addresses"),
        ("https://127.1/hook", "IP addresses"),
        ("https://user:pw@hooks.example.com/hook", "credentials"),
        ("https://user@hooks.example.com/hook", "credentials"),
        ("https://@hooks.example.com/hook", "credentials"),
        ("https://hooks.example.com\\@evil.com/hook", "backslashes"),
        ("https://hooks.example.com/ho ok", "spaces"),
        ("https://hooks.example.com/\nhook", "control characters"),
        ("https://hooks.example.com/hook#frag", "fragment"),
        ("https://hooks.example.com./hook", "DNS name"),
        ("https://hooks_example.com/hook", "DNS name"),
        ("https://hooks.example.com:99999/hook", "invalid port"),
        ("ftp://hooks.example.com/hook", "scheme"),
        ("file:///etc/passwd", "scheme"),
        ("hooks.example.com/hook", "scheme"),
        ("https:///hook", "no host"),
        ("", "scheme"),
        ("https://hooks.example.com/" + "a" * 2048, "longer than"),
    ],
)
def test_refused_callback_urls_say_why(url, reason):
    with pytest.raises(UnsupportedCallbackUrl, match=reason):
        POLICY.check(url)


def test_an_empty_allow_list_turns_webhooks_off():
    policy = CallbackPolicy([])
    assert not policy.enabled and POLICY.enabled
    for url in ("https://hooks.example.com/hook", "http://localhost:8080/hook"):
        with pytest.raises(UnsupportedCallbackUrl, match="webhooks are off"):
            policy.check(url)


@pytest.mark.parametrize(
    "entry",
    [
        "http://hooks.example.com",
        "https://10.0.0.1",
        "https://[fd00::1]:8443",
        "https://hooks.example.com/path",
        "https://hooks.example.com?x=1",
        "https://user:pw@hooks.example.com",
        "hooks.example.com",
    ],
)
def test_an_allow_list_entry_that_breaks_the_rules_is_a_startup_error(entry):
    with pytest.raises(ValueError, match="WEBHOOK_ALLOWED_ORIGINS"):
        CallbackPolicy([entry])
    with pytest.raises(ValidationError, match="WEBHOOK_ALLOWED_ORIGINS"):
        Settings(webhook_allowed_origins=entry, webhook_secret=SECRET, _env_file=None)


def test_webhook_settings():
    settings = Settings(
        webhook_allowed_origins=" https://hooks.example.com/ , http://localhost:8080",
        webhook_secret=SECRET,
        _env_file=None,
    )
    assert settings.webhook_allowed_origins == ["https://hooks.example.com/", "http://localhost:8080"]
    assert SECRET in settings.secrets()
    defaults = Settings(_env_file=None)
    assert (defaults.webhook_allowed_origins, defaults.webhook_secret) == ([], None)
    assert (defaults.webhook_timeout_s, defaults.webhook_max_attempts, defaults.webhook_backoff_s) == (10, 5, 1.0)
    with pytest.raises(ValidationError, match="WEBHOOK_SECRET is empty"):
        Settings(webhook_allowed_origins="https://hooks.example.com", _env_file=None)


@pytest.mark.parametrize(
    "secret",
    [
        base64.b64encode(bytes(32)).decode(),  # no whsec_ prefix
        "whsec_" + base64.b64encode(bytes(16)).decode(),  # too short
        "whsec_" + base64.b64encode(bytes(65)).decode(),  # too long
        "whsec_not*base64*at*all*but*long*enough*xx",
    ],
)
def test_a_secret_not_in_the_standard_format_is_refused(secret):
    with pytest.raises(ValueError, match="webhook secret"):
        WebhookSender(secret, 10, 5, 1.0)
    with pytest.raises(ValidationError, match="WEBHOOK_SECRET: the webhook secret"):
        Settings(webhook_secret=secret, _env_file=None)
