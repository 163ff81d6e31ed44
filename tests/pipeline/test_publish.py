"""``cbtstream publish`` against the real broker: valid lines published with derived keys and
headers, invalid lines rejected with their line number, exit status 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cbtstream.config import Settings
from schemas.topics import SNAPSHOT_TAKEN
from tests.support import read_topic, settings_env

pytestmark = pytest.mark.integration

VM = "50123456-aaaa-bbbb-cccc-0123456789ab"


def line(key: int, **overrides: object) -> str:
    doc: dict[str, object] = {
        "disk": {"vm_instance_uuid": VM.upper(), "vm_path": "/DC/vm/pgtest1", "vm_name": "pgtest1",
                 "device_key": key, "backing_file": f"[ds] pgtest1/pgtest1_{key}.vmdk",
                 "capacity_bytes": 1 << 20},
        "vcenter": "vc01", "vm_snapshot": "snapshot-7",
        "change_id": f"52 8a b4 5c 7b ab 8e 51-7a 73 16 d1 76 9a 0d a6/{key}",
        "taken_at": "2026-11-26T10:00:00Z",
    }
    doc.update(overrides)
    return json.dumps(doc)


async def test_publish_validates_each_line(kafka_settings: Settings, tmp_path: Path) -> None:
    lines = [
        line(2000),
        "{not json",
        line(2001, change_id="../../etc/passwd"),
        line(2002, taken_at="2026-11-26T10:00:00"),  # naive timestamp
        "",
        line(2003),
        json.dumps([1, 2]),
        line(2004, event_type="ChangeIdCommitted"),
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "cbtctl.cli", "publish", str(src)],
        env=settings_env(kafka_settings), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("cbtstream publish: line")]
    assert [e.split(":")[1].strip() for e in errors] == [
        "line 2", "line 3", "line 4", "line 7", "line 8"]
    assert "change_id" in errors[1] and "taken_at" in errors[2]
    published = [json.loads(ln) for ln in proc.stdout.splitlines()]
    assert [p["key"] for p in published] == [f"{VM}/disk-2000", f"{VM}/disk-2003"]

    recs = await read_topic(kafka_settings, SNAPSHOT_TAKEN, raw=True,
                            until=lambda r: len(r) >= 2)
    assert sorted(r.key.decode() for r in recs) == [f"{VM}/disk-2000", f"{VM}/disk-2003"]
    for r in recs:
        headers = dict(r.headers)
        assert headers["event-type"] == b"SnapshotTaken"
        assert headers["schema-version"] == b"1"
        assert b"\n" not in r.value
    # the same line again gets the same (derived) event id: the planner drops the duplicate
    again = subprocess.run(
        [sys.executable, "-m", "cbtctl.cli", "publish", "-"], input=lines[0] + "\n",
        env=settings_env(kafka_settings), capture_output=True, text=True, timeout=60,
    )
    assert again.returncode == 0
    assert json.loads(again.stdout)["event_id"] == published[0]["event_id"]
