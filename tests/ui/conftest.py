"""UI fixtures: a real contract server (uvicorn, no Ray) shared by the fast tests."""

from __future__ import annotations

import pytest

from tests.helpers import UI_KEY as KEY
from tests.ui.contract_server import METRICS, ContractServer


@pytest.fixture(scope="session")
def contract_server() -> ContractServer:
    server = ContractServer().start()
    yield server
    server.stop()


@pytest.fixture
def contract(contract_server: ContractServer) -> ContractServer:
    """The shared server with a fresh state: keys on (KEY), ready, metrics reported, empty request log."""
    state = contract_server.state
    state.api_key, state.ready, state.rate_limited, state.registry_down = KEY, True, False, False
    state.metrics = dict(METRICS)
    state.paths.clear()
    return contract_server


@pytest.fixture
def ui_env(monkeypatch: pytest.MonkeyPatch):
    """Point the page at an API the way `aipd ui` does: AIPD_UI__* variables; nothing else of the caller leaks in."""

    def _set(api_url: str, api_key: str | None = KEY, **links: str) -> None:
        import os

        for name in [n for n in os.environ if n.startswith("AIPD_")]:
            monkeypatch.delenv(name)
        monkeypatch.setenv("AIPD_UI__API_URL", api_url)
        if api_key:
            monkeypatch.setenv("AIPD_UI__API_KEY", api_key)
        for name, url in links.items():
            monkeypatch.setenv(f"AIPD_UI__{name.upper()}", url)

    return _set
