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
from dpo_lightning.sweeping.processes import group_alive

from helpers import ROOT

PG_BIN = [Path(p) for p in ("/usr/local/bin", *sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True))]


def _pg_tool(name: str) -> str | None:
    return shutil.which(name) or next((str(d / name) for d in PG_BIN if (d / name).is_file()), None)


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server on a Unix socket in a temp folder, for this module; its URL.

    Skipped only when the binaries or the driver are missing; a server that fails to start fails the test
    with its output. Whatever happens, the server is stopped and the folder removed.
    """
    initdb, pg_ctl = _pg_tool("initdb"), _pg_tool("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver psycopg2-binary is a dependency: make install")
    user = {}
    if os.geteuid() == 0:  # the server refuses to run as root: run it as an unprivileged user
        import pwd

        name = next((n for n in ("postgres", "nobody") if _has_user(n)), None)
        if name is None:
            pytest.skip("running as root and no unprivileged user to run PostgreSQL as")
        entry = pwd.getpwnam(name)
        user = {"user": entry.pw_uid, "group": entry.pw_gid}
    folder = Path(tempfile.mkdtemp(prefix="sweep-pg-"))
    data = folder / "data"
    run = {"capture_output": True, "text": True, "cwd": folder, **user}
    started = False
    try:
        if user:
            os.chown(folder, user["user"], user["group"])
        _pg(run, [initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"], folder)
        started = True  # from here on a server may run (a start that timed out, too): stop it at the end
        options = f"-k {folder} -c listen_addresses='' -c fsync=off"
        _pg(run, [pg_ctl, "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start"], folder)
        yield f"postgresql+psycopg2://postgres@/postgres?host={folder}"
    finally:
        if started:
            subprocess.run([pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], **run)
        shutil.rmtree(folder, ignore_errors=True)


def _pg(run: dict, argv: list[str], folder: Path) -> None:
    """Run a PostgreSQL tool; fail with its output and the server log's tail when it fails."""
    done = subprocess.run(argv, **run)
    if done.returncode != 0:
        log = folder / "log"
        tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
        pytest.fail(f"{Path(argv[0]).name} failed ({done.returncode}):\n{done.stdout}{done.stderr}{tail}")


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
    assert not group_alive(pgid)  # ended by the second runner (a zombie waiting for init to reap it is dead)
    done = records(out)
    assert [r["state"] for r in done] == ["interrupted", "complete", "complete"], done
    assert f"ended the trial's leftover process group {pgid}" in done[0]["reason"]
    assert sorted(r["params"]["x"] for r in done[1:]) == [0, 1]
    assert json.loads((Path(done[0]["run_dir"]) / "trial.json").read_text())["state"] == "interrupted"


def test_ending_a_trial_ends_its_whole_group_even_a_child_that_outlives_it():
    """The trial exits on SIGTERM, its child ignores SIGTERM: the child is SIGKILLed after the grace, not left."""
    from dpo_lightning.sweeping.processes import terminate

    script = '(trap "" TERM; echo ready; exec sleep 60) & wait'
    proc = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        terminate(proc, grace=0.5)
        assert proc.returncode == -signal.SIGTERM  # the trial itself ended on SIGTERM, and was waited for
        assert not group_alive(proc.pid)
    finally:
        if group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)


def test_two_runners_recovering_one_silent_trial_queue_its_point_exactly_once(tmp_path, monkeypatch):
    """Runners A and B both find a trial whose runner elsewhere went silent, and their writes interleave:
    A's reason, B's reason, A's state change (wins), B's (refused). The point is queued again once, not
    zero times (as when the last reason written decided) nor twice."""
    import argparse

    from optuna.trial import TrialState

    from dpo_lightning.sweep_space import load_sweep
    from dpo_lightning.sweeping import storage
    from dpo_lightning.sweeping.runner import Runner

    spec = load_sweep(write_sweep(tmp_path, "silent", {"x": {"values": [0]}}))
    args = argparse.Namespace(max_trials=None, storage=str(tmp_path / "s.journal"), seed=0, stale_after=60.0,
                              workers=1, retry_failed=False, trial_timeout=None, poll=0.05)  # fmt: skip
    for m in ("a", "b"):
        (tmp_path / m).mkdir()
    a, b = (Runner(spec, tmp_path / m, args) for m in ("a", "b"))
    trial = storage.claim_queued(a.study)  # taken by a runner on another host, silent for 10 minutes
    a._set(trial, "launch", {"runner": {"host": "elsewhere", "pid": 1}, "values": {"x": 0}})
    a._set(trial, "alive_at", time.time() - 600)
    frozen = a.study._storage.get_trial(trial._trial_id)
    real_set = a._set

    def a_then_b(t, key, value):
        real_set(t, key, value)
        if key == "result":  # B writes its reason right after A's
            b._set(t, "result", value | {"by": b.me["runner"]})

    monkeypatch.setattr(a, "_set", a_then_b)
    assert a.recover() == 1
    assert b._mark_interrupted(frozen, "B too") is False
    states = [t.state for t in a.study.get_trials()]
    assert states == [TrialState.FAIL, TrialState.WAITING]  # the silent trial, and its point queued once
