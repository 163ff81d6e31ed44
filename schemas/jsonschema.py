"""Generates ``schemas/json/<event>.schema.json`` from the models (``cbtstream schemas generate``)
and checks them for drift (``cbtstream schemas check`` and a test). Besides the events: the
change-ID API's request bodies and the VM description (``schemas/vm.py``)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from schemas.api import DiskCommitRequest, StoreChangeIdRequest
from schemas.events import EVENT_TYPES
from schemas.vm import VmDescription

#: Request bodies of the change-ID write API, published beside the events.
API_REQUESTS: dict[str, type[BaseModel]] = {
    "StoreChangeIdRequest": StoreChangeIdRequest, "DiskCommitRequest": DiskCommitRequest}

#: Documents that are not events, serialized as they are sent.
DOCUMENTS: dict[str, type[BaseModel]] = {"VmDescription": VmDescription}

JSON_DIR = Path(__file__).parent / "json"


def file_name(event_type: str) -> str:
    """``SnapshotTaken`` -> ``snapshot_taken.schema.json``."""
    snake = "".join(f"_{c.lower()}" if c.isupper() else c for c in event_type).lstrip("_")
    return f"{snake}.schema.json"


def render_all() -> dict[str, str]:
    """File name -> JSON text of every event's (and API request body's) schema."""
    out = {}
    models: dict[str, type[BaseModel]] = {**EVENT_TYPES, **API_REQUESTS, **DOCUMENTS}
    for name, model in models.items():
        schema = model.model_json_schema(mode="validation" if name in API_REQUESTS
                                         else "serialization")
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"https://cbtstream.dev/schemas/{file_name(name)}"
        out[file_name(name)] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def write_all(directory: Path = JSON_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, text in render_all().items():
        path = directory / fname
        path.write_text(text)
        written.append(path)
    return written


def drift(directory: Path = JSON_DIR) -> list[str]:
    """Names of schema files that are missing, stale or no longer generated."""
    expected = render_all()
    problems = [f for f, text in expected.items() if not (directory / f).is_file()
                or (directory / f).read_text() != text]
    problems += [p.name for p in directory.glob("*.schema.json") if p.name not in expected]
    return sorted(problems)
