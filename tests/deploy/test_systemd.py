"""The systemd units of deploy/systemd: ``systemd-analyze verify`` accepts them (any warning
fails: verify exits 0 on unknown keys), their drop-ins load where the README installs them,
their hardening is what they promise, each credential reaches the setting that reads it, and
each unit's command line, environment and example configuration make valid cbtstream settings.

The units run ``/opt/cbtstream/bin/cbtstream``; verify needs the program to exist, so the
copies verified here run this virtualenv's entry point instead (nothing else is changed).
Unit tests: no stack, no root; skipped only where systemd-analyze cannot run.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cbtctl.cli import build_parser
from cbtstream.config import Settings

REPO = Path(__file__).resolve().parents[2]
SYSTEMD = REPO / "deploy" / "systemd"
PROGRAM = "/opt/cbtstream/bin/cbtstream"
ENTRY_POINT = Path(sys.prefix) / "bin" / "cbtstream"
#: The unit files, and the instance each template is verified as.
UNITS = {
    "cbtstream-worker.service": "cbtstream-worker.service",
    "cbtstream-audit.service": "cbtstream-audit.service",
    "cbtstream-copier@.service": "cbtstream-copier@pool1.service",
    "cbtstream-snapshot@.service": "cbtstream-snapshot@gold.service",
    "cbtstream.target": "cbtstream.target",
}
SERVICES = [u for u in UNITS if u.endswith(".service")]
#: Where the README installs each drop-in (relative to /etc/systemd/system).
DROPINS = {
    "kafka-sasl.conf": "cbtstream-.service.d",
    "api-token.conf": "cbtstream-worker.service.d",
}


def _analyze_unavailable() -> str | None:
    if shutil.which("systemd-analyze") is None:
        return "systemd-analyze is not installed (Debian package systemd)"
    proc = subprocess.run(["systemd-analyze", "--version"], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        return f"systemd-analyze cannot run here: {proc.stderr.strip()[:200]}"
    return None


needs_analyze = pytest.mark.skipif(_analyze_unavailable() is not None,
                                   reason=str(_analyze_unavailable()))


def _install(dest: Path, *, extra_dropin: str | None = None) -> Path:
    """The units and drop-ins as the README installs them, in ``dest``, running this
    virtualenv's entry point."""
    assert ENTRY_POINT.is_file(), ENTRY_POINT
    dest.mkdir(parents=True, exist_ok=True)
    for unit in UNITS:
        text = (SYSTEMD / unit).read_text()
        (dest / unit).write_text(text.replace(PROGRAM, str(ENTRY_POINT)))
    for name, folder in DROPINS.items():
        (dest / folder).mkdir(exist_ok=True)
        shutil.copy(SYSTEMD / "dropins" / name, dest / folder / name)
    if extra_dropin is not None:
        (dest / "cbtstream-.service.d" / "zz-test.conf").write_text(extra_dropin)
    return dest


def _verify(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)


@needs_analyze
@pytest.mark.parametrize("unit", list(UNITS))
def test_systemd_analyze_verify_accepts_the_unit(unit: str, tmp_path: Path) -> None:
    units = _install(tmp_path / "system")
    proc = _verify(units / UNITS[unit])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout + proc.stderr == "", proc.stdout + proc.stderr


@needs_analyze
def test_prefix_dropin_reaches_every_service(tmp_path: Path) -> None:
    """``cbtstream-.service.d/`` (the Kafka SASL drop-in's place) applies to every service,
    templates' instances included: a drop-in with an unknown key there is reported for each."""
    units = _install(tmp_path / "system", extra_dropin="[Service]\nCbtstreamProbe=1\n")
    for unit in SERVICES:
        proc = _verify(units / UNITS[unit])
        assert "zz-test.conf:2: Unknown key 'CbtstreamProbe'" in proc.stderr, (unit, proc.stderr)


def _directives(path: Path) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit (any section), the values of each key in order."""
    out: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key, []).append(value)
    return out


@pytest.mark.parametrize("unit", SERVICES)
def test_units_are_hardened(unit: str) -> None:
    d = _directives(SYSTEMD / unit)
    assert d["User"] == ["cbtstream"] and d["Group"] == ["cbtstream"]
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "ProtectHome": "yes", "PrivateTmp": "yes", "CapabilityBoundingSet": "",
                       "RestrictSUIDSGID": "yes", "SystemCallArchitectures": "native"}.items():
        assert d[key] == [value], (unit, key)
    assert d["ExecStart"][0].startswith(f"{PROGRAM} --config /etc/cbtstream/")
    if unit == "cbtstream-copier@.service":
        # the block devices a target may be: the disk group and the device cgroup, with the
        # host's /dev; the copier stops its nbdkits itself
        assert d["SupplementaryGroups"] == ["disk"]
        assert d["DevicePolicy"] == ["closed"]
        assert "block-sd rw" in d["DeviceAllow"]
        assert d["PrivateDevices"] == ["no"]
        assert d["KillMode"] == ["mixed"]
        assert d["StateDirectory"] == ["cbtstream/copier-%i cbtstream/replicas"]
    else:
        assert d["PrivateDevices"] == ["yes"] and d["PrivateUsers"] == ["yes"]


@pytest.mark.parametrize("unit", [*SERVICES, *(f"dropins/{n}" for n in DROPINS)])
def test_each_credential_feeds_a_file_setting(unit: str) -> None:
    """Secrets come as credentials (files in %d, root-readable at their source), read by the
    settings' ``*_file`` options; never in the environment or on a command line."""
    d = _directives(SYSTEMD / unit)
    loaded = [v.split(":", 1) for v in d.get("LoadCredential", [])]
    env = dict(v.split("=", 1) for v in d.get("Environment", []))
    assert loaded, unit
    for name, source in loaded:
        assert source == f"/etc/cbtstream/credentials/{name}"
        readers = [k for k, v in env.items() if v == f"%d/{name}"]
        assert len(readers) == 1 and readers[0].endswith("_FILE"), (unit, name)
    assert not any(k.endswith(("PASSWORD", "TOKEN")) for k in env), unit


def _settings_of(unit: str, tmp: Path, monkeypatch: pytest.MonkeyPatch
                 ) -> tuple[Settings, argparse.Namespace]:
    """The settings a unit's process would load: its Environment= and that of the drop-ins that
    apply to it (specifiers resolved into ``tmp``), its credentials (made up), its --config (the
    example file of that name), its arguments parsed by cbtstream's own parser."""
    for key in [k for k in os.environ if k.startswith("CBTSTREAM_")]:
        monkeypatch.delenv(key)
    d = _directives(SYSTEMD / unit)
    for name, folder in DROPINS.items():
        if folder == "cbtstream-.service.d" or folder == f"{unit}.d":
            for key, values in _directives(SYSTEMD / "dropins" / name).items():
                d.setdefault(key, []).extend(values)
    creds, state, run = tmp / "creds", tmp / "state", tmp / "run"
    creds.mkdir(parents=True)
    specifiers = {"%d": str(creds), "%S": str(state), "%t": str(run), "%i": "pool1"}
    for value in d.get("Environment", []):
        key, _, val = value.partition("=")
        for spec, real in specifiers.items():
            val = val.replace(spec, real)
        monkeypatch.setenv(key, val)
    for value in d.get("LoadCredential", []):
        (creds / value.split(":", 1)[0]).write_text("a-secret-of-the-test-0123456789\n")
    examples = SYSTEMD / "examples"
    env_file: dict[str, str] = {}
    for line in (examples / "snapshot-gold.env").read_text().splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.partition("=")
            env_file[k] = v
    words: list[str] = []
    for word in shlex.split(d["ExecStart"][0].replace("%i", "pool1"))[1:]:
        if word.startswith("${"):  # systemd: ${VAR} is one word, $VAR split on white space
            words.append(env_file[word[2:-1]])
        elif word.startswith("$"):
            words += env_file[word[1:]].split()
        else:
            words.append(word)
    args = build_parser().parse_args(words)
    config = examples / Path(str(args.config)).relative_to("/etc/cbtstream")
    assert config.is_file(), f"{unit}: no example for {args.config}"
    monkeypatch.setenv("CBTSTREAM_CONFIG", str(config))
    return Settings(), args


def _command(args: argparse.Namespace) -> str:
    """The subcommand parsed (its module's name: cbtctl.commands.<name>)."""
    return str(args.handler.__module__).rsplit(".", 1)[-1]


def test_worker_unit_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s, args = _settings_of("cbtstream-worker.service", tmp_path, monkeypatch)
    assert _command(args) == "worker"
    assert s.streams.data_dir == tmp_path / "state/cbtstream/worker"
    assert s.vsphere.password.get_secret_value() == "a-secret-of-the-test-0123456789"


def test_copier_unit_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s, args = _settings_of("cbtstream-copier@.service", tmp_path, monkeypatch)
    assert _command(args) == "copier"
    assert s.copier.state_dir == tmp_path / "state/cbtstream/copier-pool1"
    assert s.copier.vddk.run_dir == tmp_path / "run/cbtstream-copier-pool1"
    assert s.copier.exports == "vddk"
    # the example's nbd_allow names the unit's RuntimeDirectory on a real host
    assert "unix:/run/cbtstream-copier-pool1/" in s.copier.nbd_allow
    assert s.vsphere.password.get_secret_value() == "a-secret-of-the-test-0123456789"


def test_audit_and_snapshot_unit_settings(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    s, args = _settings_of("cbtstream-audit.service", tmp_path, monkeypatch)
    assert _command(args) == "audit"
    assert s.postgres.password.get_secret_value() == "a-secret-of-the-test-0123456789"
    s, args = _settings_of("cbtstream-snapshot@.service", tmp_path / "snap", monkeypatch)
    assert (_command(args), args.every) == ("snapshot", "15m")
    assert args.vms == ["5012abcd-1111-2222-3333-444455556666",
                        "5012abcd-7777-8888-9999-000011112222"]
    assert s.vsphere.password.get_secret_value() == "a-secret-of-the-test-0123456789"


@needs_analyze
@pytest.mark.parametrize("unit", SERVICES)
def test_exposure_stays_low(unit: str, tmp_path: Path) -> None:
    """``systemd-analyze security``: at most 2.0 of 10 ("OK") for every service, the copier
    with its device access included (1.8 when written; the others 1.4)."""
    units = _install(tmp_path / "system")
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=20",
                           str(units / unit)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
