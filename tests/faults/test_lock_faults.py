"""Two runs into one folder: the second is refused naming the first; a dead run's lock is taken over."""

import json
import subprocess
import sys
import time

from ibot.io import load_safe
from ibot.train import runlock

HOLD = (  # loads runlock.py alone (stdlib only), not the ibot package: a fast second process
    "import importlib.util, sys, time; "
    f"spec = importlib.util.spec_from_file_location('runlock', {runlock.__file__!r}); "
    "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); m.acquire(sys.argv[1]); "
    "print('locked', flush=True); time.sleep(120)"
)


def test_second_run_is_refused_while_the_first_lives(tmp_path, cli):
    run = tmp_path / "run"
    run.mkdir()
    other_tmp = run / ".checkpoint.pth.abc.tmp"  # the other run's checkpoint, mid-write
    other_tmp.write_bytes(b"half")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = cli.fails("pretrain", *cli.SMOKE, f"run.output_dir={run}", needles=[f"process {holder.pid}"])
        assert "in use" in line and "run.output_dir" in line
        assert other_tmp.exists()  # its temporary file was not cleaned up under it
        assert not (run / "metrics.jsonl").exists() and not (run / "checkpoint.pth").exists()
    finally:
        holder.kill()
        holder.wait()
    code, out, _ = cli("pretrain", *cli.SMOKE, f"run.output_dir={run}", "run.max_steps=1")
    assert code == 0
    assert f"left by process {holder.pid}" in out and "no longer running" in out  # stale lock taken over
    assert load_safe(run / "checkpoint.pth")["global_step"] == 1
    assert not other_tmp.exists()  # now stale: removed


def test_stale_lock_file_of_a_dead_pid(tmp_path, cli):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / runlock.LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": "h", "started": "then"}))
    code, out, _ = cli("pretrain", *cli.SMOKE, f"run.output_dir={run}", "run.max_steps=1")
    assert code == 0 and f"process {dead.pid}" in out
    assert (run / runlock.LOCK_NAME).read_text() == ""  # released at the end of the run


def test_lock_is_reentrant_in_one_process_and_released(tmp_path):
    a = runlock.acquire(tmp_path)
    b = runlock.acquire(tmp_path)
    a.release()
    a.release()  # idempotent
    probe = [sys.executable, "-c", HOLD.replace("time.sleep(120)", "pass"), str(tmp_path)]
    assert subprocess.run(probe, capture_output=True, text=True).returncode != 0  # b still holds it
    b.release()
    start = time.time()
    out = subprocess.run(probe, capture_output=True, text=True)
    assert out.returncode == 0 and "locked" in out.stdout, out.stderr
    assert time.time() - start < 60
