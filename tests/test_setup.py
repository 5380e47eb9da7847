"""scripts/setup.sh and scripts/serve.sh as a new user meets them: no pip run once set up, and the
installed package importable from the checkout's parent directory."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _fake_venv(tmp_path: Path) -> tuple[Path, Path]:
    """A venv whose python and pensieve only record that they ran: what setup.sh would execute."""
    venv, calls = tmp_path / "venv", tmp_path / "calls"
    (venv / "bin").mkdir(parents=True)
    for tool in ("python", "pensieve"):
        script = venv / "bin" / tool
        script.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{calls}"\n[ "{tool}" = pensieve ]\n')
        script.chmod(0o755)
    return venv, calls


def _stamp() -> str:
    # what setup.sh records: sha256 of setup.sh followed by pyproject.toml
    return hashlib.sha256((ROOT / "scripts/setup.sh").read_bytes() + (ROOT / "pyproject.toml").read_bytes()).hexdigest()


def test_serve_sh_runs_no_pip_once_set_up(tmp_path: Path) -> None:
    venv, calls = _fake_venv(tmp_path)
    (venv / ".pensieve-setup").write_text(_stamp() + "\n")
    env = {**os.environ, "PENSIEVE_VENV": str(venv)}
    start = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "scripts/serve.sh"), "--port", "1234"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert calls.read_text().splitlines() == ["pensieve serve --port 1234"]  # straight to the server
    assert time.monotonic() - start < 5


def test_setup_sh_installs_when_the_stamp_is_stale(tmp_path: Path) -> None:
    venv, calls = _fake_venv(tmp_path)
    (venv / ".pensieve-setup").write_text("an older pyproject\n")
    proc = subprocess.run(["bash", str(ROOT / "scripts/setup.sh")], env={**os.environ, "PENSIEVE_VENV": str(venv)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0           # the recording python fails the install, and setup stops there
    assert calls.read_text().startswith("python ")  # but it did try to install
    assert (venv / ".pensieve-setup").read_text() == "an older pyproject\n"  # a failed setup stamps nothing


def _editable_mode() -> str:
    match = re.search(r"editable_mode=(\w+)", (ROOT / "scripts/setup.sh").read_text())
    assert match, "scripts/setup.sh installs the checkout without an editable_mode"
    return match.group(1)


@pytest.mark.parametrize("mode", ["setup.sh's", "lenient"])
def test_import_from_the_checkouts_parent(tmp_path: Path, mode: str) -> None:
    """A clone named `pensieve`, Python started beside it: the installed package must win over the
    clone's folder (a namespace package of the same name). pip's default editable mode loses; ours wins."""
    parent = tmp_path / "work"
    parent.mkdir()
    (parent / "pensieve").symlink_to(ROOT, target_is_directory=True)
    prefix = tmp_path / "prefix"
    editable = _editable_mode() if mode == "setup.sh's" else "lenient"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--prefix", str(prefix), "-e", str(parent / "pensieve"), "--config-settings", f"editable_mode={editable}"],
        capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    site_dir = sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)})
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # -S and addsitedir: only the prefix's site-packages (and its .pth files) are on the path, as in a fresh venv
    code = (f"import site, sys; site.addsitedir({site_dir!r}); "
            "from pensieve import SamplingParams; import pensieve; print(pensieve.__file__)")
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=parent, env=env, capture_output=True, text=True,
                          timeout=60)
    if mode == "lenient":
        assert proc.returncode != 0 and "cannot import name 'SamplingParams'" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr
        assert Path(proc.stdout.strip()).resolve() == (ROOT / "pensieve" / "__init__.py").resolve()
