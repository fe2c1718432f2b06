"""Crash-safe export: `blockcache-export` killed (SIGKILL) or terminated (SIGTERM) at each stage leaves
`--out` holding the old plan, byte for byte, and no staging folder after the next export; a failed
`--verify` leaves the old plan untouched. The exporter runs in a subprocess that stops at the stage
(a marker file says it got there) and waits to be signalled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY_FLAGS, cli_error, tiny_model
from exporter import export_cli
from exporter.export import export_plan
from runtime.plan import load_plan
from runtime.plan.staging import recover
from schedules import Schedule

pytestmark = pytest.mark.usefixtures("single_thread")

# Stops the exporter at a stage: after the first variant graph is written, after the manifest is
# written in the staging folder, inside --verify, or (the two-rename swap, for file systems without an
# atomic exchange) between its two renames.
STOP = r"""
import os, sys, time
stage, marker = sys.argv[1], sys.argv[2]
import exporter.export as ex
import runtime.plan.staging as st

def stop():
    open(marker, "w").close()
    time.sleep(120)

def after(module, name):
    original = getattr(module, name)
    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        stop()
        return result
    setattr(module, name, wrapped)

if stage == "variants":
    after(ex, "derive_variant")
elif stage == "manifest":
    after(ex, "write_manifest")
elif stage == "verify":
    import exporter.verify as verify
    after(verify, "verify_plan")
elif stage == "swap":
    st._exchange = lambda a, b: False
    rename = os.rename
    def renamed(src, dst):
        rename(src, dst)
        if ".old-" in os.path.basename(dst):
            stop()
    st.os.rename = renamed
from exporter.export_cli import main
sys.exit(main(sys.argv[3:]))
"""


def staged(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if ".tmp-" in n or ".old-" in n)


def snapshot(plan) -> dict:
    return {name: (plan / name).read_bytes() for name in sorted(os.listdir(plan))}


@pytest.fixture
def old_plan(tmp_path):
    model = tiny_model()
    export_plan(model, Schedule.uniform(model.unit_names, 4, 2), str(tmp_path / "plan"))
    Schedule.uniform(model.unit_names, 6, 3).save(tmp_path / "new.yaml")
    return tmp_path / "plan"


def interrupted_export(stage: str, sig: int, plan, *extra) -> subprocess.CompletedProcess:
    marker = plan.parent / f"at-{stage}"
    args = ["--model", "dit-s2", *TINY_FLAGS, "--random-init", "--schedule", plan.parent / "new.yaml", "--out", plan,
            "--quiet", *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", STOP, stage, str(marker), *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the export never reached the stage"
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("stage, extra", [("variants", ()), ("manifest", ()), ("verify", ("--verify",)),
                                          ("swap", ())])
def test_sigkill_at_any_stage_leaves_the_old_plan(stage, extra, old_plan):
    before = snapshot(old_plan)
    done = interrupted_export(stage, signal.SIGKILL, old_plan, *extra)
    assert done.returncode == -signal.SIGKILL
    assert staged(old_plan.parent)  # a killed process cleans nothing up
    if stage == "swap":  # killed between the two renames: the next export's start puts the old plan back
        assert not old_plan.exists()
        recover(str(old_plan))
    assert snapshot(old_plan) == before
    load_plan(str(old_plan))
    model = tiny_model()
    export_plan(model, Schedule.uniform(model.unit_names, 6, 3), str(old_plan))  # the next export
    assert staged(old_plan.parent) == [] and snapshot(old_plan) != before


@pytest.mark.parametrize("stage", ["manifest", "swap"])
def test_sigterm_cleans_up_at_once(stage, old_plan):
    before = snapshot(old_plan)
    done = interrupted_export(stage, signal.SIGTERM, old_plan)
    assert done.returncode == 143, done.stderr
    assert done.stderr.strip().splitlines() == ["error: terminated"]
    assert staged(old_plan.parent) == [] and snapshot(old_plan) == before


def test_a_failed_verify_leaves_the_old_plan_byte_identical(old_plan, capsys):
    before = snapshot(old_plan)
    line = cli_error(export_cli.main, ["--model", "dit-s2", *TINY_FLAGS, "--random-init", "--schedule",
                                       old_plan.parent / "new.yaml", "--out", old_plan, "--verify", "--tolerance",
                                       "1e-30", "--quiet"], capsys)
    assert "verify failed" in line
    assert snapshot(old_plan) == before and staged(old_plan.parent) == []


def test_a_new_export_removes_only_dead_exports_folders(old_plan):
    """Staging folders carry their process id: a live export's is left alone, a dead one's removed."""
    parent = old_plan.parent
    alive = parent / f".plan.tmp-{os.getpid()}-00000000"
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
    dead = parent / f".plan.tmp-{dead_pid}-11111111"
    other = parent / ".other.tmp-1-22222222"
    for folder in (alive, dead, other):
        folder.mkdir()
    recover(str(old_plan))
    assert alive.exists() and other.exists() and not dead.exists()
