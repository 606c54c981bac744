"""Preemption: SIGTERM / SIGINT save a resumable checkpoint at the next step boundary, and the resumed
run is exact on both data pipelines (the folder / PIL one included)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from ibot.config import build_config
from ibot.io import load_safe
from ibot.train.signals import SignalStopError, StopSignals
from ibot.train.trainer import Trainer


def _folder(root, n=32):
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(n // 2):
            color = (40 + 6 * i, 200 - 5 * i, 90 + 80 * c)
            Image.new("RGB", (40 + i % 5, 40), color).save(root / f"c{c}" / f"{i}.png")


def _cfg(run, data=None, *ov):
    extra = ["data.dataset=imagefolder", f"data.path={data}", "optim.batch_size=8"] if data else []
    return build_config("smoke", [f"run.output_dir={run}", "run.progress=false", "run.knn_at_end=false", *extra, *ov])


def _losses(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["loss_cls"], r["loss_patch"]) for r in rows if "loss" in r}


def _signal_at(trainer, step, sig):
    real = trainer.train_step

    def step_then_signal(batch, it, **kw):
        out = real(batch, it, **kw)
        if trainer.global_step + 1 == step:
            os.kill(os.getpid(), sig)  # arrives mid-step: handled at the step boundary
        return out

    trainer.train_step = step_then_signal


@pytest.mark.parametrize("pipeline", ["pil", "tensor"])
def test_signal_saves_and_the_resumed_run_is_exact(tmp_path, pipeline):
    data = None
    if pipeline == "pil":
        data = tmp_path / "imgs"
        _folder(data)
    ov = ["optim.epochs=2"]
    ref = Trainer(_cfg(tmp_path / "ref", data, *ov), log=lambda *a: None)
    ref.fit()
    expected = _losses(tmp_path / "ref")
    assert len(expected) == 2 * ref.data.niter and ref.data.niter >= 3

    tr = Trainer(_cfg(tmp_path / "cut", data, *ov), log=lambda *a: None)
    _signal_at(tr, 2, signal.SIGTERM)
    with pytest.raises(SignalStopError, match="stopped by SIGTERM at step 2.*--resume") as info:
        tr.fit()
    assert info.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
    ckpt = load_safe(tmp_path / "cut" / "checkpoint.pth")
    assert (ckpt["global_step"], ckpt["epoch"], ckpt["step_in_epoch"]) == (2, 0, 2)  # mid-epoch
    assert not (tmp_path / "cut" / "summary.json").exists()  # no end-of-run evaluation after a stop
    Trainer(_cfg(tmp_path / "cut", data, *ov), log=lambda *a: None).fit()
    assert _losses(tmp_path / "cut") == expected  # every loss of every step, bit for bit


def test_sigint_saves_too_and_a_second_one_interrupts_at_once(tmp_path):
    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN in a shell's background job
    tr = Trainer(_cfg(tmp_path, None, "optim.epochs=2"), log=lambda *a: None)
    _signal_at(tr, 2, signal.SIGINT)
    with pytest.raises(SignalStopError, match="stopped by SIGINT at step 2"):
        tr.fit()
    assert load_safe(tmp_path / "checkpoint.pth")["global_step"] == 2
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # the handler found at the start is restored


def test_time_based_checkpoint(tmp_path, monkeypatch):
    tr = Trainer(_cfg(tmp_path, None, "run.max_steps=3", "run.save_every_minutes=0.5"), log=lambda *a: None)
    clock = {"t": 1000.0}

    def fake_time():
        clock["t"] += 10.0  # every call 10 s later: a save is due every few steps
        return clock["t"]

    saves = []
    real_save = tr.save_checkpoint
    tr.save_checkpoint = lambda: (saves.append(tr.global_step), real_save())
    monkeypatch.setattr("ibot.train.trainer.time.time", fake_time)
    tr.fit()
    assert saves[0] < 3  # saved by time before the end of the run
    assert build_config("smoke").run.save_every_minutes == 30  # on by default


def _wait_for_steps(run, n, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        path = run / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"run did not reach {n} steps")


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_cli_process_stopped_by_signal(tmp_path, sig, code):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ibot", "pretrain", "preset=smoke", f"run.output_dir={run}", "optim.epochs=50"]
    cmd += ["run.progress=false", "run.knn_at_end=false", "run.threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_steps(run, 2, proc)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    name = signal.Signals(sig).name
    assert lines[-1].startswith(f"ibot: stopped by {name} at step ") and "--resume" in lines[-1], lines
    step = int(lines[-1].split(" at step ")[1].split()[0])
    assert load_safe(run / "checkpoint.pth")["global_step"] == step >= 2


def _torchrun(run, *ov):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    cmd += ["-m", "ibot", "pretrain", "preset=smoke", f"run.output_dir={run}", "run.progress=false"]
    # 512 images / (8 x 2 ranks): 32 steps per epoch, so a signal after a few steps lands mid-epoch
    cmd += ["optim.batch_size=8", "optim.epochs=50", "data.synthetic_size=512", "run.knn_at_end=false"]
    cmd += ["run.threads=1", *ov]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _processes_naming(text):
    """Pids of live processes whose command line holds ``text``."""
    pids = []
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    pids.append(int(d))
        except (OSError, ValueError):
            continue
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_to_the_torchrun_agent_saves_once_and_the_rerun_is_exact(tmp_path):
    """SIGTERM to the ``torchrun`` agent (what a scheduler sends) mid-epoch: its 2 gloo workers agree on
    one step boundary, save one checkpoint there and exit, no process is left, and the resumed run's
    losses equal an uninterrupted run's bit for bit."""
    run = tmp_path / "run"
    agent = _torchrun(run)
    try:
        _wait_for_steps(run, 2, agent)  # the ranks agree on the next read step (smoke logs every step)
        agent.send_signal(signal.SIGTERM)
        _, err = agent.communicate(timeout=120)
    finally:
        os.killpg(agent.pid, signal.SIGKILL) if agent.poll() is None else None
    # the only traceback is the agent's own (torch's SignalException), none from ibot's workers
    assert err.count("Traceback") == 1 and err.rstrip().endswith("got signal: 15"), err[-3000:]
    stopped = {ln for ln in err.splitlines() if ln.startswith("ibot: stopped by SIGTERM at step ")}
    assert len(stopped) == 1, err[-3000:]  # every rank reports the same step boundary
    step = int(stopped.pop().split(" at step ")[1].split()[0])
    ckpt = load_safe(run / "checkpoint.pth")
    assert ckpt["global_step"] == step and step % 32 and len(ckpt["rng_per_rank"]) == 2  # mid-epoch, both ranks
    assert sorted(_losses(run)) == list(range(1, step + 1))  # no step after the checkpoint
    assert _processes_naming(str(run)) == []  # agent and workers are gone
    rerun = _torchrun(run, f"run.max_steps={step + 2}")  # auto-resume
    ref = _torchrun(tmp_path / "ref", f"run.max_steps={step + 2}")
    for proc in (rerun, ref):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    assert _losses(run) == _losses(tmp_path / "ref")  # 0 steps lost, bitwise equal
