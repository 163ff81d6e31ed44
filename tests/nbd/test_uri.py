"""NBD URIs and the endpoint allow-list."""

from __future__ import annotations

import pytest

from cbtstream.errors import ConfigError, PermissionDenied
from consumers.nbd.uri import NbdAddress, check_allowed, parse_nbd_uri


def test_parse_tcp_and_unix() -> None:
    assert parse_nbd_uri("nbd://127.0.0.1:10810/snap%201") == NbdAddress(
        export="snap 1", host="127.0.0.1", port=10810
    )
    assert parse_nbd_uri("nbds://host/").tls
    assert parse_nbd_uri("nbd://host").port == 10809
    unix = parse_nbd_uri("nbd+unix:///exp?socket=/run/a/../b.sock")
    assert unix.socket_path == "/run/b.sock" and unix.export == "exp"


@pytest.mark.parametrize(
    "uri",
    ["http://x/", "nbd:///nohost", "nbd+unix:///?socket=rel.sock", "nbd+unix:///", "nbd://h:99999"],
)
def test_bad_uris(uri: str) -> None:
    with pytest.raises(ConfigError):
        parse_nbd_uri(uri)


def test_allow_list() -> None:
    a = parse_nbd_uri("nbd://127.0.0.1:10810")
    check_allowed(a, ["127.0.0.1"])
    check_allowed(a, ["10.0.0.1", "127.0.0.1:10810"])
    with pytest.raises(PermissionDenied):
        check_allowed(a, ["127.0.0.1:10809"])
    with pytest.raises(PermissionDenied):
        check_allowed(a, [])
    with pytest.raises(PermissionDenied):
        check_allowed(parse_nbd_uri("nbd://127.0.0.10"), ["127.0.0.1"])
    u = parse_nbd_uri("nbd+unix:///?socket=/run/s.sock")
    check_allowed(u, ["unix:/run/s.sock"])
    with pytest.raises(PermissionDenied):
        check_allowed(u, ["127.0.0.1", "unix:/run/other.sock"])
    v6 = parse_nbd_uri("nbd://[::1]:10810")
    check_allowed(v6, ["[::1]:10810"])
    with pytest.raises(PermissionDenied):
        check_allowed(v6, ["[::1]:1"])
