"""`ibot config --explain` (meanings parsed from the config's own comments) and `--config FILE` input."""

import json

from ibot.cli import main
from ibot.config import build_config, flatten, to_dict
from ibot.config_help import field_comments


def test_every_key_has_its_meaning_from_the_source():
    notes = field_comments()
    keys = set(flatten(to_dict(build_config())))
    assert keys == set(notes)  # every field carries a comment, and nothing else is picked up
    assert notes["optim.lr"] == "for a total batch of 256 (scaled linearly)"
    assert notes["run.allow_schedule_change"].startswith("resume with changed optim schedule keys")


def test_config_explain_prints_each_key_value_and_meaning(capsys):
    assert main(["config", "--explain", "preset=smoke", "optim.lr=0.002"]) == 0
    out = capsys.readouterr().out.splitlines()
    lr = next(line for line in out if line.startswith("optim.lr = "))
    assert lr.split("#")[0].strip() == "optim.lr = 0.002" and lr.endswith(
        "# for a total batch of 256 (scaled linearly)"
    )
    keyed = [line for line in out if not line.startswith("# ")]
    assert len(keyed) == len(field_comments()) and "(no description)" not in "\n".join(out)


def test_pretrain_takes_a_config_file_and_overrides_win(tmp_path, capsys):
    saved = to_dict(build_config("smoke", ["optim.lr=0.002", "loss.teacher_temp=0.05", f"run.output_dir={tmp_path}/a"]))
    (tmp_path / "config.json").write_text(json.dumps(saved))
    run = tmp_path / "b"
    args = ["pretrain", "--config", str(tmp_path / "config.json"), f"run.output_dir={run}", "optim.lr=0.003"]
    assert main([*args, "run.max_steps=1", "run.knn_at_end=false", "run.progress=false"]) == 0
    used = json.loads((run / "config.json").read_text())
    assert used["optim"]["lr"] == 0.003 and used["loss"]["teacher_temp"] == 0.05  # file, then key=value
    assert used["model"]["embed_dim"] == 32 and used["data"]["dataset"] == "synthetic"  # the smoke config
    assert not (tmp_path / "a").exists()


def test_bad_config_file_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("optim:\n  epoch: 3\n")
    assert main(["config", "--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ibot: error: unknown config key 'optim.epoch'; did you mean optim.epochs")
    (tmp_path / "list.yaml").write_text("- 1\n")
    assert main(["config", "--config", str(tmp_path / "list.yaml")]) == 2
    assert "is not a config file" in capsys.readouterr().err
