"""Fast tests of the stack's pure logic and of the Service base on a trivial real process."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from cbtctl.stack import system
from cbtctl.stack.kafka import TOOLS, server_properties, tool_script
from cbtctl.stack.postgres import Postgres, bootstrap_sql, quote_ident, quote_literal
from cbtctl.stack.service import _CHILDREN, Service, pid_alive, process_start_time
from cbtstream.config import Settings, StackSettings
from cbtstream.errors import StackError


def _props(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return dict(pairs)


def test_server_properties_single_combined_node() -> None:
    stack = StackSettings(host="127.0.0.1", kafka_port=29092, kafka_controller_port=29093)
    props = _props(server_properties(stack, Path("/s/kafka/data")))
    assert props["process.roles"] == "broker,controller"
    assert props["node.id"] == "1"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:29093"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:29092,CONTROLLER://127.0.0.1:29093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:29092"
    assert props["controller.listener.names"] == "CONTROLLER"
    assert props["log.dirs"] == "/s/kafka/data"
    assert props["auto.create.topics.enable"] == "false"
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert props["transaction.state.log.min.isr"] == "1"
    for key in ("offsets.topic.num.partitions", "transaction.state.log.num.partitions"):
        assert props[key] == "4"
    replication = [k for k in props if k.endswith("replication.factor")]
    assert len(replication) >= 3
    assert all(props[k] == "1" for k in replication)


def test_tool_script_uses_the_broker_classpath_and_quiet_logging() -> None:
    script = tool_script("/usr/bin/java", Path("/d/tools-log4j.properties"), Path("/s/lib"),
                         TOOLS["kafka-topics"])
    assert script.startswith("#!/bin/sh\n")
    assert "-Dlog4j.configuration='file:/d/tools-log4j.properties'" in script
    assert "-cp '/s/lib/*' org.apache.kafka.tools.TopicCommand \"$@\"" in script


def test_sql_quoting() -> None:
    assert quote_ident('a"b') == '"a""b"'
    assert quote_literal("it's") == "'it''s'"
    sql = bootstrap_sql("app", "pa'ss", "db")
    assert "PASSWORD 'pa''ss';" in sql
    assert sql.count("\\gexec") == 2  # role and database only created when missing
    assert sql.startswith("SET log_min_error_statement = panic;")


def test_missing_packages_names_debian_packages() -> None:
    tools = (
        system.Tool("sh", "dash"),
        system.Tool("no-such-tool-xyz", "pkg-b"),
        system.Tool("other", "pkg-a", Path("/nonexistent/other")),
        system.Tool("again", "pkg-b", Path("/nonexistent/again")),
    )
    assert system.missing_packages(tools) == ["pkg-a", "pkg-b"]


def test_missing_tools_without_root_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(system, "is_root", lambda: False)
    with pytest.raises(StackError, match="pkg-zz"):
        system.ensure_tools([system.Tool("no-such-tool-xyz", "pkg-zz")])


def test_postgres_layout_is_under_the_state_dir(tmp_path: Path) -> None:
    pg = Postgres(Settings(stack=StackSettings(dir=tmp_path, postgres_port=25432)))
    argv, _ = pg.command()
    assert pg.data == tmp_path / "postgres" / "data"
    assert pg.pid_file == tmp_path / "run" / "postgres.pid"
    assert pg.log_file == tmp_path / "logs" / "postgres.log"
    assert list(argv[3:5]) == ["-p", "25432"]
    assert f"unix_socket_directories={tmp_path}/postgres/run" in argv
    assert "listen_addresses=127.0.0.1" in argv
    assert "cbtstream" not in " ".join(argv)  # no credentials on the command line


class Sleeper(Service):
    """A real background process that is ready as soon as it runs."""

    name = "sleeper"

    def install(self) -> None:
        pass

    def command(self) -> tuple[Sequence[str], Mapping[str, str] | None]:
        return ["sleep", "60"], None

    def probe(self) -> bool:
        return True


def test_service_start_stop_is_idempotent(tmp_path: Path) -> None:
    svc = Sleeper(Settings(stack=StackSettings(dir=tmp_path)))
    try:
        svc.start()
        pid = svc.pid()
        assert pid is not None and pid_alive(pid)
        svc.start()  # already running: no second process
        assert svc.pid() == pid
        svc.wait_ready(5)
        assert svc.status().ready
    finally:
        svc.stop()
    assert not pid_alive(pid)
    assert not svc.pid_file.exists()
    svc.stop()  # twice is fine
    assert not svc.status().running


def test_recycled_pid_is_never_signalled(tmp_path: Path) -> None:
    """A pid file naming a live process with another start time is not ours: stop() spares it."""
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        svc = Sleeper(Settings(stack=StackSettings(dir=tmp_path)))
        svc.pid_file.parent.mkdir(parents=True)
        real = process_start_time(bystander.pid)
        assert real is not None
        svc.pid_file.write_text(f"{bystander.pid} {int(real) + 1}\n")
        assert svc.pid() is None
        svc.stop()
        assert bystander.poll() is None
    finally:
        os.killpg(bystander.pid, signal.SIGKILL)
        bystander.wait()


class Crasher(Sleeper):
    """A service whose process dies at once, as Kafka does when its port is taken."""

    name = "crasher"

    def command(self) -> tuple[Sequence[str], Mapping[str, str] | None]:
        return ["sh", "-c", "echo 'bind: address already in use' >&2; exit 3"], None

    def probe(self) -> bool:
        return False


def test_a_service_that_exits_fails_loudly_with_its_log(tmp_path: Path) -> None:
    svc = Crasher(Settings(stack=StackSettings(dir=tmp_path)))
    svc.start()
    with pytest.raises(StackError, match="address already in use"):
        svc.wait_ready(10)
    svc.stop()
    assert not svc.pid_file.exists()
    assert not [c for c in _CHILDREN.values() if c.args[0] == "sh"]  # reaped: no zombie left


def test_connection_info_never_shows_the_password(tmp_path: Path) -> None:
    from pydantic import SecretStr

    from cbtctl.commands.stack import _connection_info
    from cbtctl.stack.manager import StartReport
    from cbtstream.config import PostgresSettings

    settings = Settings(
        stack=StackSettings(dir=tmp_path),
        postgres=PostgresSettings(password=SecretStr("hunter2-secret")),
    )
    reports = [StartReport("postgres", True, 0.1, 0.2, Postgres(settings).endpoint())]
    text = _connection_info(settings, reports)
    assert "postgresql://cbtstream@127.0.0.1:15432/cbtstream" in text
    assert "hunter2" not in text
