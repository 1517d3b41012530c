"""The ports a local Ray node is started with (each component its own, never one handed out twice), and the Ray
settings every process of the project starts with."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.ray_nodes import ensure_auth_token, free_ports, node_ports


def test_ports_are_distinct_within_a_call_and_across_calls() -> None:
    first = free_ports(40)
    assert len(set(first)) == 40
    assert not set(first) & set(free_ports(40)), "a port given to one component is never given to another"


def test_a_nodes_components_get_ports_of_their_own() -> None:
    ports = node_ports([])
    single = [v for k, v in ports.items() if k not in ("min-worker-port", "max-worker-port")]
    assert len(set(single)) == len(single)


def test_the_project_defaults_turn_off_ray_datas_usage_poller() -> None:
    """Ray Data's own test of the setting: its poller thread, which outlives ray.shutdown() and then ends the
    process with status 1, does not start in a process with the project's defaults."""
    code = (
        "from app.ray_nodes import use_ray_defaults; use_ray_defaults()\n"
        "from ray.data._internal.usage.collector import usage_collection_disabled\n"
        "print(usage_collection_disabled())"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "True", done.stderr[-2000:]


def test_a_fresh_machine_gets_a_token_from_ray_and_a_token_found_is_taken_without_asking_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No token anywhere: Ray's own CLI makes one where Ray reads it. A token in any of Ray's places (the variable,
    the file the path variable names, the default file) is used as it is, with no `ray` process started."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    ensure_auth_token()
    made = tmp_path / ".ray" / "auth_token"
    assert made.read_text().strip(), "ray get-auth-token --generate wrote no token"

    def no_process(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a process was started for a token that exists: {args}")

    monkeypatch.setattr(subprocess, "run", no_process)
    ensure_auth_token()
    made.unlink()
    elsewhere = tmp_path / "token"
    elsewhere.write_text("abc")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(elsewhere))
    ensure_auth_token()
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "abc")
    ensure_auth_token()
