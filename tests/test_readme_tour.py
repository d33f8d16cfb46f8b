"""The README's guided tour, every command run in order as written (scenarios shortened with --steps)."""
from __future__ import annotations

import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SHORT_STEPS = {"collapse": "20", "drift": "8"}  # enough for the planted fault (step 10) to take over


def tour_commands() -> list[list[str]]:
    section = README.read_text().split("## Guided tour\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```text\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command = re.split(r"\s{2,}#", line, maxsplit=1)[0].strip()  # comments follow two spaces and '#'
            if command:
                commands.append(shlex.split(command))
    return commands


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_answers(args: list[str], cwd: Path) -> None:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moescope", *args, "--port", str(port)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                runs = httpx.get(f"http://127.0.0.1:{port}/api/runs", timeout=5).json()
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read().decode()
                assert time.monotonic() < deadline, "moescope serve did not come up"
                time.sleep(0.5)
        assert {"incident-unbalanced", "incident-planted"} <= {r["run"] for r in runs}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_tour_is_the_commands_this_test_runs():
    commands = tour_commands()
    assert all(c[0] == "moescope" for c in commands)
    assert [c[1] for c in commands] == ["scenario", "runs", "check", "serve", "report", "scenario", "alerts", "alerts"]


@pytest.mark.timeout(1500)  # two short scenarios and a report on a busy CPU
def test_every_tour_command_runs_in_order(tmp_path, monkeypatch):
    monkeypatch.delenv("MOESCOPE_STORE", raising=False)
    monkeypatch.delenv("MOESCOPE_BROKER_URL", raising=False)
    outputs = {}
    for command in tour_commands():
        args = command[1:]
        if args[0] == "serve":
            _serve_answers(args, tmp_path)
            continue
        if args[0] == "scenario":
            args = [*args, "--steps", SHORT_STEPS[args[1]], "--quiet"]
        result = subprocess.run([sys.executable, "-m", "moescope", *args], cwd=tmp_path, capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, f"{shlex.join(command)}\n{result.stdout}\n{result.stderr}"
        outputs[" ".join(args[:2])] = result.stdout
    assert "collapse detection flags layer 1 of the planted run" in outputs["scenario collapse"]
    assert "saturation ends at 1" in outputs["scenario drift"]
    assert "incident-planted" in outputs["runs --store"]
    assert (tmp_path / "incident.html").is_file()
    assert "firing" in outputs["alerts test"]  # the planted takeover fires the layer-1 rule
