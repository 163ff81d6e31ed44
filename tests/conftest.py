"""Shared fixtures, and the rule that splits the suite into unit and integration tests.

The rule
--------
A test that needs the *stack* carries the ``integration`` marker; every other test is a unit
test. ``make unit`` runs ``pytest -m "not integration and not soak" tests``: every unit test,
wherever it lives, in seconds, on a machine that only ran ``make install``. ``make test`` runs
everything against the stack started by ``cbtstream stack up``.

*The stack* is the services: Kafka, PostgreSQL and the vSphere simulator (the dev stack's, or a
private one a test builds with go and starts), and the pipeline processes that talk to them.
Installed tools are not the stack: a unit test may run ``nbdkit``, ``qemu-nbd`` or
``qemu-img`` if it skips when the program is missing (``tests.nbd.nbdkit.needs_nbdkit`` and
``needs_nbdkit_tls``, the ``skipif`` of ``tests/copy/test_qemu_nbd_source.py``), and may serve
NBD from this process.

The check
---------
:data:`STACK_FIXTURES` are the fixtures through which tests reach the stack. A fixture that
reaches a service takes one of them (``stack_settings`` for the dev stack's address, never
``load_settings()`` itself), so every fixture built on them (``kafka_settings``,
``audit_schema``, the e2e pipeline, the hardening lanes, the API workers, ``sasl_settings``...)
has them in its closure. At collection, a test whose fixture closure holds one of them and that
has no ``integration`` marker stops the run with a usage error naming the test and the fixture,
under every ``-m`` (so ``make unit`` cannot start a test that waits on a broker, and ``make test``
cannot let one drift out of the marker). A test that connects without a fixture is not caught
here: run the unit selection with the services pointed at closed ports to prove it
(``CBTSTREAM_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:9 CBTSTREAM_POSTGRES__PORT=9
CBTSTREAM_VSPHERE__URL=https://127.0.0.1:9/sdk make unit`` passes).

Integration tests use the local stack; each gets its own topic prefix, so tests never see each
other's events.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cbtstream.config import Settings, load_settings
from cbtstream.kafka import create_topics
from tests.support import isolated_settings, kafka_answers

#: The fixtures that reach the stack, and what they reach. ``item.fixturenames`` is a test's
#: whole fixture closure, so everything built on these counts too.
STACK_FIXTURES = {
    "stack_settings": "the dev stack's Kafka, PostgreSQL and simulator (tests/stack: a private "
                      "stack the test starts)",
    "vcsim": "a private vSphere simulator, built with go and started (tests/vsphere)",
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a stack test without the ``integration`` marker (see the module docstring); skip
    ``soak`` tests (long crash, fault, bad-input and load runs) unless ``-m soak`` selects them
    (``make soak``). ``tryfirst``: before ``-m`` deselects anything."""
    unmarked = [
        f"  {item.nodeid}: its fixtures reach {' and '.join(sorted(used))}"
        for item in items
        if item.get_closest_marker("integration") is None
        and (used := STACK_FIXTURES.keys() & set(getattr(item, "fixturenames", ())))
    ]
    if unmarked:
        raise pytest.UsageError(
            "tests that use the stack need the `integration` marker (tests/conftest.py):\n"
            + "\n".join(unmarked) + "\n"
            + "".join(f"  ({name}: {what})\n" for name, what in STACK_FIXTURES.items()))
    if "soak" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="soak test: run with `make soak` (pytest -m soak)")
    for item in items:
        if item.get_closest_marker("soak") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def stack_settings() -> Settings:
    """Settings of the running dev stack (env vars may point elsewhere)."""
    return load_settings()


@pytest.fixture
async def kafka_settings(stack_settings: Settings, tmp_path: Path) -> AsyncIterator[Settings]:
    """Isolated settings on the real broker, with every topic created."""
    if not await kafka_answers(stack_settings):
        pytest.fail(
            f"Kafka does not answer at {stack_settings.kafka.bootstrap_servers}: "
            "run `cbtstream stack up` (make test does)"
        )
    settings = isolated_settings(stack_settings, tmp_path)
    await create_topics(settings.kafka)
    yield settings
