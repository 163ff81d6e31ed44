"""Secrets come from the environment or files and never show up in logs, output or errors.

The real processes run with distinctive secret values: the Faust worker and the copier (over
Kafka SASL_SSL, one replication cycle of a simulator VM, byte-for-byte checked), the worker's
HTTP API with its bearer token, ``cbtstream publish`` (good and wrong Kafka password),
``cbtstream stack status``, and a copier whose vCenter login fails. Every log line, stdout and
stderr of all of them is searched for every secret. The Kafka SASL password is the stack's random
one, read from its password file; the PostgreSQL password comes from a ``password_file``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from pydantic import SecretStr

from cbtctl.demo.processes import child_env
from cbtctl.demo.run import stack_settings
from cbtctl.demo.scenario import Scenario, random_name
from cbtctl.demo.workload import MiB, initial_fill
from cbtstream.config import KafkaSettings, PostgresSettings, Settings, VSphereSettings, to_env
from cbtstream.errors import ConfigError
from cbtstream.vsphere.simctl import SimulatorControl
from tests.e2e.conftest import Pipeline
from tests.pipeline.test_publish import line

TAG = os.urandom(4).hex()
PG_SECRET = f"pg-S3cret-{TAG}"
API_TOKEN = f"api-T0ken-{TAG}"
VC_WRONG = f"vc-Wr0ng-{TAG}"
KAFKA_WRONG = f"kafka-Wr0ng-{TAG}"


def _secret_file(path: Path, value: str) -> Path:
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def secret_settings(sasl_settings: Settings, tmp_path: Path) -> Settings:
    """SASL_SSL Kafka, PostgreSQL password from a file, an API token, verified vCenter TLS."""
    s = stack_settings(sasl_settings)
    data = s.model_dump()
    data["log_level"] = "DEBUG"
    data["postgres"] |= {"password_file": _secret_file(tmp_path / "pg.secret", PG_SECRET)}
    data["api"] |= {"token": SecretStr(API_TOKEN)}
    data["copier"] |= {"state_dir": tmp_path / "copier"}
    return Settings.model_validate(data)


def _secrets(settings: Settings) -> dict[str, str]:
    kafka = settings.kafka.sasl_password
    assert kafka is not None
    return {"kafka": kafka.get_secret_value(), "postgres": PG_SECRET, "api": API_TOKEN,
            "vcenter-wrong": VC_WRONG, "kafka-wrong": KAFKA_WRONG}


def _assert_clean(name: str, text: str, secrets: dict[str, str]) -> None:
    for what, value in secrets.items():
        assert value not in text, f"{what} secret appears in {name}"


def test_secret_files_and_repr(tmp_path: Path) -> None:
    pg = _secret_file(tmp_path / "pg", PG_SECRET)
    kf = _secret_file(tmp_path / "kafka", KAFKA_WRONG)
    vc = _secret_file(tmp_path / "vc", VC_WRONG)
    s = Settings(postgres=PostgresSettings(password_file=pg),
                 kafka=KafkaSettings(sasl_password_file=kf),
                 vsphere=VSphereSettings(password_file=vc))
    assert s.postgres.password.get_secret_value() == PG_SECRET
    assert s.kafka.sasl_password is not None
    assert s.kafka.sasl_password.get_secret_value() == KAFKA_WRONG
    assert s.vsphere.password.get_secret_value() == VC_WRONG
    assert s.postgres.connect_kwargs()["password"] == PG_SECRET
    s = s.model_copy(update={"api": s.api.model_copy(update={"token": SecretStr(API_TOKEN)})})
    for text in (repr(s), str(s), s.model_dump_json(), repr(s.model_dump())):
        for secret in (PG_SECRET, KAFKA_WRONG, VC_WRONG, API_TOKEN):
            assert secret not in text
    # only to_env (for our own child processes) holds the values
    env = to_env(s)
    assert env["CBTSTREAM_POSTGRES__PASSWORD"] == PG_SECRET
    assert env["CBTSTREAM_API__TOKEN"] == API_TOKEN


def test_secret_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pg = _secret_file(tmp_path / "pg", PG_SECRET)
    monkeypatch.setenv("CBTSTREAM_POSTGRES__PASSWORD_FILE", str(pg))
    monkeypatch.setenv("CBTSTREAM_VSPHERE__PASSWORD", VC_WRONG)
    s = Settings()
    assert s.postgres.password.get_secret_value() == PG_SECRET
    assert s.vsphere.password.get_secret_value() == VC_WRONG


def test_unreadable_secret_file_names_the_path_only(tmp_path: Path) -> None:
    missing = tmp_path / "nope.secret"
    with pytest.raises(ConfigError, match=r"cannot read secret file .*nope\.secret"):
        PostgresSettings(password_file=missing)


def _run_cli(args: list[str], settings: Settings, stdin: str = ""
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cbtctl.cli", *args], env=child_env(settings), input=stdin,
        capture_output=True, text=True, timeout=90, check=False,
    )


@pytest.mark.integration
async def test_processes_never_print_secrets(secret_settings: Settings, tmp_path: Path) -> None:
    settings = secret_settings
    secrets = _secrets(settings)
    outputs: dict[str, str] = {}
    sim = SimulatorControl.from_state(settings.stack.dir.resolve() / "vcsim")
    pipeline = Pipeline(settings, tmp_path / "logs")
    pipeline.start_copier()
    scenario = Scenario(settings, sim, tmp_path / "models", seed=7, timeout_s=90)
    scenario.check_alive.append(pipeline.check)
    try:
        vm = await scenario.create_vm(random_name("sec"), [4 * MiB])
        d = vm.disks[0]
        result = await scenario.cycle(1, initial_fill(scenario.rng, d.key, d.capacity))
        assert [r.verified for r in result.rows] == [True]
        # the worker's HTTP API: the token works, a wrong one is refused
        url = (f"http://{settings.streams.web_host}:{settings.streams.web_port}"
               f"/api/v1/vms/{vm.instance_uuid}/disks")
        async with aiohttp.ClientSession() as http:
            async with http.get(url, headers={"Authorization": f"Bearer {API_TOKEN}"}) as r:
                assert r.status == 200, await r.text()
            async with http.get(url, headers={"Authorization": f"Bearer {VC_WRONG}"}) as r:
                assert r.status == 401
    finally:
        await scenario.close()
        pipeline.stop()

    publish = _run_cli(["publish"], settings, line(2000) + "\n")
    assert publish.returncode == 0, publish.stderr
    wrong_kafka = settings.model_copy(update={"kafka": settings.kafka.model_copy(
        update={"sasl_password": SecretStr(KAFKA_WRONG), "sasl_password_file": None})})
    refused = _run_cli(["publish"], wrong_kafka, line(2001) + "\n")
    assert refused.returncode != 0
    assert "SCRAM-SHA-512 login as 'cbtstream' refused" in refused.stderr
    status = _run_cli(["stack", "status"], settings)
    assert "kafka" in status.stdout
    wrong_vc = settings.model_copy(update={"vsphere": settings.vsphere.model_copy(
        update={"password": SecretStr(VC_WRONG)})})
    login = _run_cli(["copier"], wrong_vc)
    assert login.returncode != 0
    assert "login" in login.stderr.lower(), login.stderr

    for name, proc in (("publish", publish), ("publish-wrong", refused),
                       ("stack-status", status), ("copier-wrong-vc", login)):
        outputs[f"{name} stdout"] = proc.stdout
        outputs[f"{name} stderr"] = proc.stderr
    for f in sorted((tmp_path / "logs").glob("*.log")):
        outputs[f.name] = f.read_text(errors="replace")
    # not vacuous: the processes did log their work, at DEBUG level
    assert "sync committed" in outputs["copier-1.log"]
    assert '"disk_key"' in outputs["worker.log"]
    for name, text in outputs.items():
        _assert_clean(name, text, secrets)
