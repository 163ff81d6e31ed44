"""The images of the deployment tests, built once per session (see tests/deploy/podman.py)."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cbtstream.config import Settings
from consumers.audit.repository import AuditRepository
from tests.deploy import podman

HERE = Path(__file__).resolve().parent


#: The packages the image installs (pyproject.toml's wheel packages).
PACKAGES = ("cbtstream", "cbtctl", "schemas", "streams", "producers", "consumers")


def source_hashes(root: Path) -> dict[str, str]:
    """``package/.../module.py`` -> sha256 of every module of the packages under ``root``."""
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for pkg in PACKAGES for f in sorted((root / pkg).rglob("*.py"))}


@dataclass(frozen=True)
class Images:
    """The production image and the stand-in image, with how long their builds took, and the
    working tree's modules as they were when the build started."""

    image: str
    standin: str
    image_build_s: float
    standin_build_s: float
    sources: dict[str, str]


@pytest.fixture(scope="session")
def images() -> Images:
    """Build the image as an operator without a registry would (``deploy/image/build.sh
    --debian-base --host-trust``), then the stand-in image on top of it; skipped only where
    podman cannot be installed."""
    reason = podman.unavailable()
    if reason is not None:
        pytest.skip(reason)
    tags = (podman.IMAGE, podman.BUILD_IMAGE, podman.STANDIN_IMAGE)
    before = {tag: podman.image_id(tag) for tag in tags}
    sources = source_hashes(podman.REPO)
    image_s = podman.build(podman.IMAGE, "--debian-base", "--host-trust",
                           log=podman.CACHE / "build-image.log")
    podman.build(podman.BUILD_IMAGE, "--debian-base", "--host-trust",  # cached: only a tag
                 podman_args=["--target", "build"], log=podman.CACHE / "build-stage.log")
    standin_s = podman.build(podman.STANDIN_IMAGE, "--file", str(HERE / "Dockerfile.standin"),
                             "--build-arg", f"IMAGE={podman.IMAGE}", "--host-trust",
                             log=podman.CACHE / "build-standin.log")
    for tag in tags:
        podman.replaced(tag, before[tag])
    print(f"\nimages built: {podman.IMAGE} in {image_s:.0f}s, {podman.STANDIN_IMAGE} in "
          f"{standin_s:.0f}s (logs in {podman.CACHE})")
    return Images(podman.IMAGE, podman.STANDIN_IMAGE, image_s, standin_s, sources)


@pytest.fixture
async def audit_schema(stack_settings: Settings) -> AsyncIterator[str]:
    """A PostgreSQL schema of the test's own for the audit consumer, dropped afterwards."""
    schema = f"audit_t{uuid.uuid4().hex[:10]}"
    repo = AuditRepository(stack_settings.postgres, schema=schema, timeout_s=3)
    await repo.start()
    try:
        yield schema
    finally:
        await repo.reset_schema(replace=True)
        await repo.stop()
