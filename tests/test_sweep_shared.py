"""Several runners on one sweep through shared storage (a journal file, a real PostgreSQL), and crash safety.

The runners are separate `dpo-lightning sweep` processes with their own sweep folders, as on two machines;
their trials are trivial (tests/fixtures/sweep_fake_trial.py). PostgreSQL is a throwaway cluster started
from the binaries on PATH (Debian's postgresql package: initdb, pg_ctl) in a temp folder.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_sweep import records, write_sweep

from dpo_lightning import sweep

from helpers import ROOT

PG_BIN = [Path(p) for p in ("/usr/local/bin", *sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True))]


def _pg_tool(name: str) -> str | None:
    return shutil.which(name) or next((str(d / name) for d in PG_BIN if (d / name).is_file()), None)


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server on a Unix socket in a temp folder, for this module; its URL."""
    initdb, pg_ctl = _pg_tool("initdb"), _pg_tool("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver psycopg2-binary is a dependency: make install")
    folder = Path(tempfile.mkdtemp(prefix="sweep-pg-"))
    user = {}
    if os.geteuid() == 0:  # the server refuses to run as root: run it as an unprivileged user
        import pwd

        name = next((n for n in ("postgres", "nobody") if _has_user(n)), None)
        if name is None:
            pytest.skip("running as root and no unprivileged user to run PostgreSQL as")
        entry = pwd.getpwnam(name)
        os.chown(folder, entry.pw_uid, entry.pw_gid)
        user = {"user": entry.pw_uid, "group": entry.pw_gid}
    data = folder / "data"
    run = {"check": True, "capture_output": True, "cwd": folder, **user}
    subprocess.run([initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"], **run)
    options = f"-k {folder} -c listen_addresses='' -c fsync=off"
    subprocess.run([pg_ctl, "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start"], **run)
    try:
        yield f"postgresql+psycopg2://postgres@/postgres?host={folder}"
    finally:
        subprocess.run([pg_ctl, "-D", str(data), "-m", "immediate", "stop"], **(run | {"check": False}))
        shutil.rmtree(folder, ignore_errors=True)


def _has_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _runner(path: Path, out: Path, storage: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "dpo_lightning", "sweep", str(path), "--out", str(out), "--storage", storage]
    return subprocess.Popen(argv + ["--poll", "0.05"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


GATED = (  # a trial that waits until the test opens the gate, then logs val/loss = x
    "import sys,time,pathlib;a=dict(x[2:].split('=',1) for x in sys.argv[1:]);g=pathlib.Path(a['gate']);"
    "t=time.time();exec('while not g.exists() and time.time()-t<60: time.sleep(0.02)');"
    "pathlib.Path(a['run.dir'],'metrics.csv').write_text('step,val/loss\\n1,'+a['x']+'\\n')"
)


def _wait_for(check, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 60
    while not check():
        assert proc.poll() is None and time.monotonic() < deadline, f"{what}: " + proc.stdout.read()
        time.sleep(0.05)


def _two_runners_share_the_grid(tmp_path: Path, storage: str) -> None:
    """Runner A takes a point and its trial waits; runner B starts and takes one too; then the gate opens and
    both finish the grid: together they ran every point once."""
    gate = tmp_path / "gate"
    command = ["${interpreter}", "-c", GATED, "${args}"]
    parameters = {"gate": {"value": str(gate)}, "x": {"values": [0, 1, 2, 3, 4, 5]}}
    path = write_sweep(tmp_path, "shared", parameters, command=command)
    a = _runner(path, tmp_path / "machine_a", storage)
    _wait_for(lambda: records(tmp_path / "machine_a"), a, "runner A started no trial")
    b = _runner(path, tmp_path / "machine_b", storage)
    _wait_for(lambda: records(tmp_path / "machine_b"), b, "runner B started no trial")
    gate.touch()
    outputs = [p.communicate(timeout=120)[0] for p in (a, b)]
    assert [a.returncode, b.returncode] == [0, 0], outputs
    done = [r for m in ("machine_a", "machine_b") for r in records(tmp_path / m)]
    assert [r["state"] for r in done] == ["complete"] * 6, done
    assert sorted(r["params"]["x"] for r in done) == [0, 1, 2, 3, 4, 5]  # the union is the grid, no point twice
    assert sorted(r["trial"] for r in done) == list(range(6))


def test_two_runners_share_one_sweep_through_a_journal_file(tmp_path):
    _two_runners_share_the_grid(tmp_path, str(tmp_path / "shared.journal"))


def test_two_runners_share_one_sweep_through_postgresql(tmp_path, postgres_url):
    _two_runners_share_the_grid(tmp_path, postgres_url)


def test_a_restarted_runner_ends_the_leftovers_of_a_killed_one_then_runs_their_points(tmp_path):
    """SIGKILL leaves the runner's trial running (its own session); the next runner finds it by the recorded
    process group and start time, ends it, and runs its point again."""
    marker = tmp_path / "slept"
    code = ("import sys,time,pathlib;a=dict(x[2:].split('=',1) for x in sys.argv[1:]);d=pathlib.Path(a['run.dir']);"
            f"m=pathlib.Path({str(marker)!r});slow=not m.exists();m.touch();"
            "time.sleep(60 if slow and a['x']=='0' else 0);"
            "(d/'metrics.csv').write_text('step,val/loss\\n1,'+a['x']+'\\n')")  # fmt: skip
    path = write_sweep(tmp_path, "crash", {"x": {"values": [0, 1]}}, command=["${interpreter}", "-c", code, "${args}"])
    out = tmp_path / "crash"
    argv = [sys.executable, "-m", "dpo_lightning", "sweep", str(path), "--out", str(out), "--poll", "0.05"]
    first = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (records(out) and records(out)[0].get("pgid")):
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    pgid = records(out)[0]["pgid"]
    first.kill()  # SIGKILL: no chance to clean up
    first.wait()
    os.killpg(pgid, 0)  # the orphaned trial is still running

    assert sweep.main([str(path), "--out", str(out), "--poll", "0.05"]) == 0
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)  # ended by the second runner
    done = records(out)
    assert [r["state"] for r in done] == ["interrupted", "complete", "complete"], done
    assert f"ended the trial's leftover process group {pgid}" in done[0]["reason"]
    assert sorted(r["params"]["x"] for r in done[1:]) == [0, 1]
    assert json.loads((Path(done[0]["run_dir"]) / "trial.json").read_text())["state"] == "interrupted"
    assert signal.SIGKILL  # (the kill above is the runner's, not the trial's)
