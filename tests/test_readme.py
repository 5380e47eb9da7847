"""The README as a new user follows it: its offline snippet runs as written (on the demo model), its
commands are spelled one way, and every flag it names exists."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _section(title: str) -> str:
    return README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_offline_snippet_runs_as_written(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    from pensieve.demo import demo_gguf_path
    from pensieve.errors import CheckpointError

    try:
        demo_gguf_path()
    except CheckpointError as exc:
        pytest.skip(str(exc))
    [snippet] = re.findall(r"```python\n(.*?)```", _section("Offline, in Python"), flags=re.S)
    # run from a bare directory, as a user would; the package comes from the checkout under test
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Paris" in proc.stdout.splitlines()[0]
    # a library prints nothing of its own: no engine log lines (slow steps) from the offline API
    assert "slow step" not in proc.stderr and "pensieve" not in proc.stderr, proc.stderr[-2000:]


def test_commands_are_spelled_one_way() -> None:
    shell = "\n".join(_code_blocks("bash"))
    assert ".venv/bin/pensieve" not in README        # one way to run it: from the activated venv
    first_use = min(m.start() for m in re.finditer(r"^\s*pensieve ", shell, flags=re.M))
    assert "source .venv/bin/activate" in README[:README.index(shell[first_use:first_use + 40].strip())]


def test_every_flag_in_the_readme_exists() -> None:
    from pensieve.cli import build_parser

    commands = next(a for a in build_parser(with_bench=True)._actions if isinstance(a, argparse._SubParsersAction))
    known = {flag for sub in commands.choices.values() for action in sub._actions for flag in action.option_strings}
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", README.replace("--[no-]", "--")))
    assert len(named) > 10 and named <= known, sorted(named - known)


def test_curl_names_the_served_demo_model() -> None:
    from pensieve.demo import DEMO_SERVED_NAME

    assert f'"model": "{DEMO_SERVED_NAME}"' in "\n".join(_code_blocks("bash"))


def test_the_library_prints_no_log_lines_of_its_own() -> None:
    """Logging is the application's to configure: a warning of the engine's, with no handler set up, goes
    nowhere (no Python last-resort line on stderr: it would break bench's progress bar and LLM()'s output)."""
    code = "import logging, pensieve; logging.getLogger('pensieve.engine.llm_engine').warning('slow step 9.9 s')"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
