"""The end-to-end fixtures (simulator, pipeline processes, scenario) for replay tests."""

from tests.e2e.conftest import (  # noqa: F401 - fixtures and the report hook, by import
    e2e_settings,
    pipeline,
    pytest_runtest_makereport,
    scenario,
    sim,
)
