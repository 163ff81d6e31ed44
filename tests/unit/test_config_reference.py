"""``cbtstream config``: the generated reference (docs/configuration.md) matches the settings
models and documents every setting; ``config show`` prints the configuration in effect or the
defaults, as TOML or JSON, and never a secret."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from pydantic import SecretStr

from cbtctl.cli import main
from cbtctl.commands.config import REGENERATE, plain, reference, sections, show_toml
from cbtstream.config import Settings

ROOT = Path(__file__).resolve().parents[2]
SECRETS = {
    "CBTSTREAM_KAFKA__SASL_PASSWORD": "kafka-s3cret-value-1",
    "CBTSTREAM_POSTGRES__PASSWORD": "pg-s3cret-value-2",
    "CBTSTREAM_VSPHERE__PASSWORD": "vc-s3cret-value-3",
    "CBTSTREAM_API__TOKEN": "api-s3cret-token-value-4",
}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No CBTSTREAM_* variable of the calling environment (nor a config file) leaks in."""
    import os

    for name in [n for n in os.environ if n.startswith("CBTSTREAM_")]:
        monkeypatch.delenv(name)
    return monkeypatch


def test_committed_reference_matches_the_models() -> None:
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == reference(), (
        f"docs/configuration.md is stale: run `.venv/bin/{REGENERATE}` and commit it")


def test_every_setting_is_documented() -> None:
    entries = [e for s in sections() for e in s.entries]
    assert len(entries) > 90
    assert [e.name for e in entries if not e.description] == []
    assert [s.name for s in sections() if s.name != "(top level)" and not s.description] == []
    names = {e.name: e for e in entries}
    # nested sections and lists of tables are included, with how to set them
    assert names["copier.vddk.libdir"].env == "`CBTSTREAM_COPIER__VDDK__LIBDIR`"
    assert names["copier.targets[].disk"].env == "inside the JSON of `CBTSTREAM_COPIER__TARGETS`"
    assert names["kafka.partitions"].type == "int (>= 1, <= 1024)"
    assert names["postgres.password"].type == "secret"
    assert names["postgres.password"].default == "`**********`"  # even a default is masked
    assert names["copier.request_bytes"].default == "`4194304` (4 MiB)"
    assert names["kafka.security_protocol"].type.startswith('"PLAINTEXT" \\| "SSL"')


def test_the_documented_variables_are_the_ones_read(clean_env: pytest.MonkeyPatch) -> None:
    entries = {e.name: e.env.strip("`") for s in sections() for e in s.entries}
    clean_env.setenv(entries["kafka.partitions"], "7")
    clean_env.setenv(entries["copier.vddk.libdir"], "/opt/vddk")
    clean_env.setenv(entries["streams.orphan_consolidate"], "true")
    clean_env.setenv(entries["copier.targets"], '[{"vm": "5012abcd-1111-2222-3333-444455556666",'
                                                ' "file": "{vm}/{disk_id}.img"}]')
    s = Settings()
    assert s.kafka.partitions == 7
    assert s.copier.vddk.libdir == Path("/opt/vddk")
    assert s.streams.orphan_consolidate is True
    assert s.copier.targets[0].file == "{vm}/{disk_id}.img"


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["config", *args]) == 0
    return capsys.readouterr().out


def test_show_masks_every_secret(clean_env: pytest.MonkeyPatch, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    secret_file = tmp_path / "vddk-password"
    secret_file.write_text("file-s3cret-value-5\n")
    for name, value in SECRETS.items():
        clean_env.setenv(name, value)
    clean_env.setenv("CBTSTREAM_COPIER__VDDK__PASSWORD_FILE", str(secret_file))
    text = _run(capsys, "show")
    as_json = _run(capsys, "show", "--json")
    for out in (text, as_json):
        for value in (*SECRETS.values(), "file-s3cret-value-5"):
            assert value not in out
        assert str(secret_file) in out  # a *_file setting is a path, shown as such
    doc = json.loads(as_json)
    assert doc["kafka"]["sasl_password"] == "**********"
    assert doc["api"]["token"] == "**********"
    assert doc["kafka"]["sasl_username"] is None
    assert 'token = "**********"  # default: unset' in text
    assert 'password = "**********"  # default: "**********"' in text  # differs, says only that


def test_show_effective_against_defaults(clean_env: pytest.MonkeyPatch, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "cbtstream.toml"
    config.write_text('[kafka]\npartitions = 6\n[copier.vddk]\nlibdir = "/opt/vddk"\n'
                      '[[copier.targets]]\ndisk = "5012abcd-1111-2222-3333-444455556666/disk-1"\n'
                      'device = "/dev/disk/by-id/x"\n')
    clean_env.setenv("CBTSTREAM_CONFIG", str(config))
    clean_env.setenv("CBTSTREAM_STREAMS__WEB_PORT", "7000")
    text = _run(capsys, "show")
    assert text.startswith(f"# cbtstream configuration: environment (CBTSTREAM_*) over {config}")
    assert "partitions = 6  # default: 4" in text
    assert "web_port = 7000  # default: 6066" in text
    assert '[copier.vddk]\nplugin = "vddk"' in text
    assert '[[copier.targets]]\ndisk = "5012abcd-1111-2222-3333-444455556666/disk-1"' in text
    defaults = json.loads(_run(capsys, "show", "--defaults", "--json"))
    assert defaults["kafka"]["partitions"] == 4
    assert defaults["streams"]["web_port"] == 6066
    assert defaults["copier"]["targets"] == []


def test_shown_toml_reads_back(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The TOML is a configuration file: read back, it gives the same settings (secrets aside:
    they are masked)."""
    config = tmp_path / "cbtstream.toml"
    config.write_text('[kafka]\npartitions = 6\nsasl_password = "kafka-s3cret-value-1"\n'
                      '[copier]\nnbd_allow = ["127.0.0.1", "unix:/run/x/"]\n'
                      '[[copier.targets]]\nvm = "5012abcd-1111-2222-3333-444455556666"\n'
                      'nbd = "nbd://127.0.0.1:10809/vm1-{disk_id}"\n')
    clean_env.setenv("CBTSTREAM_CONFIG", str(config))
    settings = Settings()
    shown = show_toml(settings, Settings.model_construct())
    again = Settings.model_validate(tomllib.loads(shown))
    assert again.kafka.sasl_password == SecretStr("**********")
    assert plain(again) == plain(settings)  # every value the same, secrets masked on both sides
    assert again.copier.targets == settings.copier.targets and again.kafka.partitions == 6
