"""Safe API defaults, without a worker: a write always needs a token, a worker reachable from
other machines needs one to start, and a configuration error never echoes a secret."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import SecretStr, ValidationError

from cbtstream.config import Settings, is_loopback, load_settings
from cbtstream.errors import ConfigError
from streams.api import authorized
from streams.store_api import write_refusal

TOKEN = "0123456789abcdef-token"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost",
                                  "LocalHost"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "", "::", "10.0.0.5", "192.168.1.10",
                                  "planner.example", "localhost.example", "128.0.0.1"])
def test_non_loopback_hosts(host: str) -> None:
    assert not is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.5", "planner.example"])
def test_non_loopback_bind_without_token_refused(host: str) -> None:
    with pytest.raises(ValidationError, match="CBTSTREAM_API__TOKEN") as info:
        Settings.model_validate({"streams": {"web_host": host}, "api": {"token": None}})
    assert f"streams.web_host {host!r} is not a loopback address" in str(info.value)


def test_non_loopback_bind_with_token_accepted(tmp_path: os.PathLike[str]) -> None:
    s = Settings.model_validate({"streams": {"web_host": "0.0.0.0"}, "api": {"token": TOKEN}})
    assert s.api.token == SecretStr(TOKEN)
    token_file = os.path.join(tmp_path, "api-token")
    with open(token_file, "w") as f:
        f.write(TOKEN + "\n")
    s = Settings.model_validate({"streams": {"web_host": "0.0.0.0"},
                                 "api": {"token_file": token_file}})
    assert s.api.token is not None and s.api.token.get_secret_value() == TOKEN


def test_loopback_bind_without_token_accepted() -> None:
    s = Settings.model_validate({"streams": {"web_host": "127.0.0.1"}, "api": {"token": None}})
    assert s.api.token is None


@pytest.mark.parametrize("token", ["", "short-secret"])
def test_short_token_refused_without_echoing_it(token: str) -> None:
    with pytest.raises(ValidationError, match="at least 16 characters") as info:
        Settings.model_validate({"api": {"token": token}})
    if token:
        assert token not in str(info.value)


def test_config_errors_never_echo_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole-settings error (pydantic shows a model's whole input by default) and a misspelt
    secret setting (its value is the input of the error)."""
    monkeypatch.setenv("CBTSTREAM_POSTGRES__PASSWORD", "pg-secret-in-env-0001")
    monkeypatch.setenv("CBTSTREAM_STREAMS__WEB_HOST", "0.0.0.0")
    monkeypatch.delenv("CBTSTREAM_API__TOKEN", raising=False)
    monkeypatch.delenv("CBTSTREAM_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="CBTSTREAM_API__TOKEN") as info:
        load_settings()
    assert "pg-secret-in-env-0001" not in str(info.value)
    monkeypatch.delenv("CBTSTREAM_STREAMS__WEB_HOST")
    monkeypatch.setenv("CBTSTREAM_KAFKA__SASL_PASWORD", "kafka-secret-misspelt-02")
    with pytest.raises(ConfigError, match=r"kafka\.sasl_pasword: Extra inputs") as info:
        load_settings()
    assert "kafka-secret-misspelt-02" not in str(info.value)


def test_worker_refuses_to_start_on_a_public_address_without_token() -> None:
    """``cbtstream worker`` exits 1 before it touches Kafka, saying how to configure a token."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CBTSTREAM_API__") and k != "CBTSTREAM_CONFIG"}
    env |= {"CBTSTREAM_STREAMS__WEB_HOST": "0.0.0.0",
            "CBTSTREAM_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:9"}  # nothing to reach there
    proc = subprocess.run([sys.executable, "-m", "cbtctl.cli", "worker"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "streams.web_host '0.0.0.0' is not a loopback address" in proc.stderr
    assert "CBTSTREAM_API__TOKEN" in proc.stderr


# -- writes ------------------------------------------------------------------------------------
def test_write_without_configured_token_is_forbidden() -> None:
    """No token configured: nobody can be authenticated, so every write is refused, with or
    without an Authorization header."""
    for header in (None, "Bearer anything-at-all-000000", "Basic czNjcmV0"):
        refused = write_refusal(header, lambda h: authorized(h, None))
        assert refused is not None and refused.status == 403
        assert refused.body["error"] == "Writes need an API token"
        assert "CBTSTREAM_API__TOKEN" in refused.body["details"]


def test_write_with_configured_token() -> None:
    check = lambda h: authorized(h, TOKEN)  # noqa: E731
    for header in (None, "Bearer wrong-token-0000000000", TOKEN, "Basic czNjcmV0"):
        refused = write_refusal(header, check)
        assert refused is not None and refused.status == 401, header
    assert write_refusal(f"Bearer {TOKEN}", check) is None
