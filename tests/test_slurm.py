"""docs/slurm.md's sbatch template: torchrun under srun gets a valid command line, and really trains."""

import json
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "examples" / "slurm_pretrain.sbatch"


def _exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _fake_slurm(bin_dir: Path, head: str) -> None:
    """srun: drop its own --options and run the command once (one node); scontrol: list the nodes."""
    bin_dir.mkdir(exist_ok=True)
    _exe(bin_dir / "srun", '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    _exe(bin_dir / "scontrol", f'#!/bin/bash\nprintf "{head}\\nnode-b\\n"\n')


def _env(bin_dir: Path, **extra) -> dict:
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_JOB_ID": "4242",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def test_doc_shows_the_tested_template():
    doc = (ROOT / "docs" / "slurm.md").read_text()
    block = re.search(r"```bash\n(#!/bin/bash\n.*?)```", doc, re.S).group(1)
    assert block == TEMPLATE.read_text()


def test_template_gives_torchrun_and_ibot_a_valid_command_line(tmp_path):
    bin_dir = tmp_path / "bin"
    _fake_slurm(bin_dir, "node-a")
    record = tmp_path / "argv.json"
    dump = f'import json, sys\njson.dump(sys.argv[1:], open("{record}", "w"))\n'
    _exe(bin_dir / "torchrun", f"#!{sys.executable}\n{dump}")
    env = _env(bin_dir, SLURM_JOB_NUM_NODES="2")
    res = subprocess.run(["bash", str(TEMPLATE), "data.path=/data/in1k", "run.output_dir=/runs/x"], env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stderr
    argv = json.loads(record.read_text())
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args(argv)
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend) == ("2", "8", "c10d")
    assert (args.rdzv_endpoint, args.rdzv_id, args.module) == ("node-a:29500", "4242", True)
    assert args.training_script == "ibot" and args.training_script_args[0] == "pretrain"
    from ibot.cli import _split_overrides, build_parser
    from ibot.config import build_config

    ns, extra = build_parser().parse_known_args(args.training_script_args)
    preset, overrides = _split_overrides(ns.overrides + extra)
    cfg = build_config(preset, overrides)
    assert (cfg.model.arch, cfg.data.path, cfg.run.output_dir) == ("vit_small_patch16_224", "/data/in1k", "/runs/x")


def test_template_trains_under_a_fake_srun(tmp_path):
    bin_dir = tmp_path / "bin"
    _fake_slurm(bin_dir, "localhost")
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = _env(bin_dir, SLURM_JOB_NUM_NODES="1", GPUS_PER_NODE="2", PRESET="smoke", MASTER_PORT=str(port))
    run = tmp_path / "run"
    args = [f"run.output_dir={run}", "run.max_steps=2", "run.knn_at_end=false", "run.progress=false"]
    res = subprocess.run(["bash", str(TEMPLATE), *args, "optim.batch_size=8"], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    from ibot.io import load_safe

    ckpt = load_safe(run / "checkpoint.pth")
    assert ckpt["world_size"] == 2 and ckpt["global_step"] == 2
