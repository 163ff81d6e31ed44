"""NBD over TLS against a real ``nbdkit --tls=require``: the server's certificate is verified by
default (the copier's settings name the CA), an untrusted certificate is refused before any
block is read, and only ``copier.nbd_tls_verify=false`` turns verification off."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cbtctl.stack.certs import CertFiles, make_certs
from cbtstream.config import CopierSettings
from cbtstream.tls import nbd_tls_context
from consumers.copy.sources import open_nbd_source
from consumers.nbd.errors import NbdError, NbdNegotiationError
from tests.nbd.nbdkit import nbdkit, needs_nbdkit_tls

SIZE = 1024 * 1024


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[CertFiles, CertFiles]:
    """The server's CA + certificate, and a second, unrelated CA."""
    root = tmp_path_factory.mktemp("pki")
    return make_certs(root / "server"), make_certs(root / "other", ca_name="someone else")


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(SIZE)
    path = tmp_path / "disk.img"
    path.write_bytes(data)
    return path, data


def _tls_server(tmp: Path, certs: CertFiles, image: Path):  # type: ignore[no-untyped-def]
    return nbdkit(tmp, "-r", "--tls=require", f"--tls-certificates={certs.dir}", "file",
                  str(image), tcp=True)


def test_defaults_verify() -> None:
    assert CopierSettings().nbd_tls_verify is True
    assert nbd_tls_context(CopierSettings()) is None  # plain nbd:// unless asked
    ctx = nbd_tls_context(CopierSettings(nbd_tls=True))
    assert ctx is not None and ctx.check_hostname and ctx.verify_mode.name == "CERT_REQUIRED"


@needs_nbdkit_tls
async def test_verified_tls_reads_the_bytes(
    tmp_path: Path, pki: tuple[CertFiles, CertFiles], image: tuple[Path, bytes]
) -> None:
    server, _ = pki
    copier = CopierSettings(nbd_tls=True, nbd_cafile=server.ca_cert)
    with _tls_server(tmp_path, server, image[0]) as uri:
        async with open_nbd_source(uri, ("127.0.0.1",), connections=2,
                                   tls_context=nbd_tls_context(copier)) as src:
            buf = bytearray(SIZE)
            await src.read_into(0, memoryview(buf))
            assert src.size == SIZE
            assert len(src.clients) == 2  # every connection negotiated TLS
    assert bytes(buf) == image[1]


@needs_nbdkit_tls
async def test_server_requiring_tls_refuses_plain_client(
    tmp_path: Path, pki: tuple[CertFiles, CertFiles], image: tuple[Path, bytes]
) -> None:
    with (_tls_server(tmp_path, pki[0], image[0]) as uri,
          pytest.raises(NbdNegotiationError, match="requires TLS")):
        async with open_nbd_source(uri, ("127.0.0.1",), tls_context=None):
            pass


@needs_nbdkit_tls
@pytest.mark.parametrize("cafile", ["other", "system"])
async def test_untrusted_certificate_is_refused(
    tmp_path: Path, pki: tuple[CertFiles, CertFiles], image: tuple[Path, bytes], cafile: str
) -> None:
    server, other = pki
    copier = CopierSettings(nbd_tls=True,
                            nbd_cafile=other.ca_cert if cafile == "other" else None)
    with _tls_server(tmp_path, server, image[0]) as uri:
        with pytest.raises(NbdError, match="certificate verify failed"):
            async with open_nbd_source(uri, ("127.0.0.1",),
                                       tls_context=nbd_tls_context(copier)):
                pass
        # the nbds:// form without any copier TLS setting verifies too (system trust store)
        with pytest.raises(NbdError, match="certificate verify failed"):
            async with open_nbd_source(uri.replace("nbd://", "nbds://"), ("127.0.0.1",)):
                pass


@needs_nbdkit_tls
async def test_verification_opt_out_is_explicit(
    tmp_path: Path, pki: tuple[CertFiles, CertFiles], image: tuple[Path, bytes]
) -> None:
    server, _ = pki
    copier = CopierSettings(nbd_tls=True, nbd_tls_verify=False)  # no CA at all
    with _tls_server(tmp_path, server, image[0]) as uri:
        async with open_nbd_source(uri, ("127.0.0.1",),
                                   tls_context=nbd_tls_context(copier)) as src:
            buf = bytearray(4096)
            await src.read_into(SIZE - 4096, memoryview(buf))
    assert bytes(buf) == image[1][-4096:]
