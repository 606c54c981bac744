"""The training checkpoint: its format, what makes one fit a run, and resuming from it.

A :class:`Checkpointer` saves and restores the model, optimizer, scaler, config, every rank's RNG
streams and the trainer's counters (``COUNTERS``) in one ``ibot-1`` file (FSDP2 states gathered to
plain tensors, so a checkpoint resumes in any world size). It refuses a checkpoint made with
another model (``STRUCTURAL_KEYS``) or, unless ``run.allow_schedule_change``, other schedules
(``SCHEDULE_KEYS``); a missing or corrupt newest file falls back to the one saved before it. The
file itself is written and read by :mod:`ibot.io` (atomic, checksummed).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.distributed as dist

from ibot import distributed as D
from ibot.builders.sources import CHECKPOINT, checkpoint_config, resolve_source
from ibot.config import flatten, from_dict, saved_config, to_dict
from ibot.io import CheckpointError, load_safe, previous_path, save_atomic
from ibot.train.schedules import Schedules

# keys whose change makes a checkpoint incompatible (shapes / the method itself)
STRUCTURAL_KEYS = (
    "method",
    "model.arch",
    "model.patch_size",
    "model.img_size",
    "model.in_chans",
    "model.embed_dim",
    "model.depth",
    "model.num_heads",
    "model.window_size",
    "model.depths",
    "model.stage_heads",
    "model.out_dim",
    "model.patch_out_dim",
    "model.shared_head",
    "model.hidden_dim",
    "model.bottleneck_dim",
    "model.head_layers",
    "model.head_norm",
    "mask.enabled",  # the student's mask token
    "model.norm_last_layer",  # decides which head weights the optimizer holds
)
# keys a checkpoint must hold for ``pretrain --resume``
REQUIRED_KEYS = ("model", "optimizer", "epoch", "step_in_epoch", "global_step", "config", "rng")
# keys of the per-step lr / weight decay / momentum schedules: changing one on resume moves them
SCHEDULE_KEYS = (
    "optim.epochs",
    "optim.batch_size",
    "optim.lr",
    "optim.min_lr",
    "optim.warmup_epochs",
    "optim.weight_decay",
    "optim.weight_decay_end",
    "optim.momentum_teacher",
)
# the trainer's position and image counts, saved with the state (in this order)
COUNTERS = ("epoch", "step_in_epoch", "global_step", "seen_images", "skipped_images", "attempted_images")
FORMAT = "ibot-1"


class Checkpointer:
    """Saves and restores a run's training state in ``run.output_dir``'s ``checkpoint.pth``.

    Args:
        cfg: the run's config (saved with the state; compared on resume).
        model, optimizer, scaler: what is saved (``scaler`` may be None).
        schedules: the run's :class:`Schedules` (to show the jump a schedule change makes).
        niter: steps per epoch of this run (bounds the converted position).
        fsdp: the model is FSDP2-sharded (states are gathered / sharded; every rank saves and loads).
        log: callable for human-readable lines.
    """

    def __init__(self, cfg, model, optimizer, scaler, schedules: Schedules, niter: int, fsdp: bool = False, log=print):
        self.cfg, self.model, self.optimizer, self.scaler = cfg, model, optimizer, scaler
        self.schedules, self.niter, self.fsdp, self.log = schedules, niter, fsdp, log
        self.path = Path(cfg.run.output_dir) / CHECKPOINT
        self._saved_at = None

    # ------------------------------------------------------------------ save
    def state_dict(self, counters: dict, rng: list[dict] | None = None) -> dict:
        """The checkpoint (with FSDP: gathered to plain tensors; every rank must call it).

        ``counters``: the trainer's ``COUNTERS``; ``rng``: every rank's RNG states
        (:func:`gather_rng_states`), default this process's only.
        """
        rng = rng or [rng_state()]
        if self.fsdp:
            from ibot.train.fsdp import full_model_state, full_optimizer_state

            model_sd, optim_sd = full_model_state(self.model), full_optimizer_state(self.optimizer)
        else:
            model_sd, optim_sd = self.model.state_dict(), self.optimizer.state_dict()
        return {
            "model": model_sd,
            "optimizer": optim_sd,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            **{k: counters[k] for k in COUNTERS},
            "data_position": counters.get("data_position"),  # a stream's: every rank's and worker's rows read
            "config": to_dict(self.cfg),
            "world_size": D.world_size(),
            "rng": rng[0],
            "rng_per_rank": rng,
            "format": FORMAT,
        }

    def save(self, counters: dict) -> bool:
        """Save (every rank calls it); False, writing nothing, when the last save was at the same position."""
        position = (counters["epoch"], counters["step_in_epoch"], counters["global_step"])
        if self._saved_at == position:
            return False
        rng = gather_rng_states()  # every rank's streams (a collective: every rank calls it)
        state = self.state_dict(counters, rng) if self.fsdp or D.is_main() else None
        if D.is_main():
            save_atomic(state, self.path, keep_previous=True)
        if D.is_dist():
            dist.barrier()
        self._saved_at = position
        return True

    # ------------------------------------------------------------------ load
    def resume(self, resume: str) -> dict | None:
        """The counters to continue from: ``resume`` is "auto" (this run folder's checkpoint, when
        there is one), "never", or a checkpoint / run folder; None when training starts fresh."""
        if resume == "never":
            return None
        path = self.path if resume == "auto" else resolve_source(resume, checkpoint_only=True)
        if path.is_file() or previous_path(path).is_file():
            return self.load_or_previous(path)
        if resume != "auto":
            raise CheckpointError(f"no checkpoint at {path}; start a new run without --resume")
        return None

    def load_or_previous(self, path: Path) -> dict:
        """:meth:`load` ``path``; when it is missing or corrupt, the one saved before it (with a message)."""
        prev = previous_path(path)
        try:  # only an unreadable file falls back; a checkpoint that does not fit this run is an error
            if not path.is_file():
                raise CheckpointError(f"checkpoint {path} is missing (a save was interrupted)")
            ckpt = load_safe(path)
        except CheckpointError as err:
            if not prev.is_file():
                raise
            self.log(f"warning: {err}; resuming from the previous checkpoint {prev} instead")
            path, ckpt = prev, load_safe(prev)
        return self.load(path, ckpt)

    def load(self, path: str | Path, ckpt: dict | None = None) -> dict:
        """Restore model, optimizer, scaler and this rank's RNG from ``path`` (``ckpt``: its content,
        when already read); returns the counters to continue from (``COUNTERS``, and ``data_position``: where
        a stream stood, or None), the position converted to this run's total batch."""
        ckpt = load_safe(path) if ckpt is None else ckpt
        if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
            raise CheckpointError(
                f"{path} is not an ibot training checkpoint; to start from its weights use run.init_from={path}"
            )
        missing = [k for k in REQUIRED_KEYS if k not in ckpt]
        if missing:
            raise CheckpointError(
                f"{path} lacks {', '.join(missing)} (not a complete `ibot pretrain` checkpoint); "
                f"resume from another checkpoint or start from its weights with run.init_from={path}"
            )
        saved = resumable_config(path, ckpt["config"])
        old, new = flatten(saved), flatten(to_dict(self.cfg))
        diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in STRUCTURAL_KEYS if old.get(k) != new.get(k)]
        if diff:
            raise CheckpointError(
                f"checkpoint {path} was made with an incompatible config ({'; '.join(diff)}); "
                "use the same settings or a new run.output_dir"
            )
        self.check_schedules(path, ckpt, saved)
        try:
            if self.fsdp:
                from ibot.train.fsdp import load_sharded_state

                load_sharded_state(self.model, self.optimizer, ckpt["model"], ckpt["optimizer"])
            else:
                self.model.load_state_dict(ckpt["model"])
                self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise CheckpointError(
                f"{path} does not fit this model ({first}); use the settings it was made with"
            ) from err
        if self.scaler and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        counters = {k: ckpt[k] for k in ("epoch", "step_in_epoch", "global_step")}
        counters["seen_images"] = ckpt.get("seen_images", 0)
        counters["skipped_images"] = ckpt.get("skipped_images", 0)
        counters["attempted_images"] = ckpt.get(
            "attempted_images", counters["skipped_images"] + counters["seen_images"] // D.world_size()
        )
        counters["data_position"] = ckpt.get("data_position")
        old_world = ckpt.get("world_size", 1)
        counters["step_in_epoch"] = self.convert_position(
            counters["step_in_epoch"], old.get("optim.batch_size", self.cfg.optim.batch_size) * old_world
        )
        if D.world_size() == old_world:
            # each rank continues its own streams (drop-path differs per rank); older checkpoints
            # hold rank 0's only
            per_rank = ckpt.get("rng_per_rank") or [ckpt["rng"]] * D.world_size()
            set_rng_state(per_rank[D.rank()])
        return counters

    def convert_position(self, step_in_epoch: int, old_total: int) -> int:
        """``step_in_epoch`` of a run with total batch ``old_total`` in steps of this run's total batch.

        The epoch order is (seed, epoch)-determined: the images already trained on this epoch are kept, in
        steps of the new total batch (a larger batch or more processes: fewer steps per epoch).
        """
        new_total = self.cfg.optim.batch_size * D.world_size()
        if old_total == new_total:
            return step_in_epoch
        return min(step_in_epoch * old_total // new_total, self.niter)

    def check_schedules(self, path, ckpt: dict, saved: dict) -> None:
        """Refuse resuming with other lr / weight-decay / momentum schedules unless run.allow_schedule_change
        (``saved``: the checkpoint's config, :func:`resumable_config`)."""
        old, new = flatten(saved), flatten(to_dict(self.cfg))
        changed = [k for k in SCHEDULE_KEYS if k in old and old[k] != new[k]]
        if not changed:
            return
        step = ckpt["global_step"]
        was = Schedules.from_config(from_dict(saved), self.niter, ckpt.get("world_size", 1))[step]
        now = self.schedules[step]
        jump = (
            f"at step {step} the lr would go {was.lr:.3g} -> {now.lr:.3g} and the "
            f"teacher momentum {was.momentum:.6g} -> {now.momentum:.6g}"
        )
        what = ", ".join(f"{k} {old[k]!r} -> {new[k]!r}" for k in changed)
        if not self.cfg.run.allow_schedule_change:
            raise CheckpointError(
                f"{path} was trained with other schedules ({what}); {jump}. Resume with the old values, "
                "or add run.allow_schedule_change=true to recompute the schedules over the new length"
            )
        self.log(f"schedules changed ({what}): {jump}")


# ---------------------------------------------------------------------- RNG streams
def rng_state() -> dict:
    """This process's CPU torch, CUDA (current device, when initialised) and Python RNG states."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def gather_rng_states() -> list[dict]:
    """Every rank's :func:`rng_state`, in rank order (one process: a list of one)."""
    mine = rng_state()
    if not D.is_dist():
        return [mine]
    parts = [None] * D.world_size()
    dist.all_gather_object(parts, mine)
    return parts


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    py = random.getstate()
    random.setstate((py[0], tuple(state["python"]), None))


# ---------------------------------------------------------------------- configs of checkpoints
def resumable_config(path, config: dict) -> dict:
    """A checkpoint's saved config as this version reads it (:func:`ibot.config.saved_config`).

    Keys this version does not know refuse the resume in one line: resuming continues the same run,
    and a key of a newer ibot may change what that run trains (a loss term, a schedule), so dropping it
    would silently continue another run in the same folder. Evaluation and export ignore such keys
    with a warning (:func:`ibot.builders.sources.checkpoint_config`).
    """
    kept, unknown = saved_config(config)
    if unknown:
        raise CheckpointError(
            f"{path} was saved by a newer ibot (config keys this version does not know: {', '.join(unknown)}); "
            f"resume it with that version, or start a new run from its weights with run.init_from={path}"
        )
    return kept


def resume_config(path: Path) -> dict:
    """The saved config (nested dict) of the checkpoint to resume; of the previous one when it is corrupt."""
    if not path.exists() and not previous_path(path).is_file():
        raise CheckpointError(f"no checkpoint at {path}; start a new run without --resume")
    try:
        ckpt = load_safe(path) if path.is_file() or not previous_path(path).is_file() else None
    except CheckpointError:
        if not previous_path(path).is_file():
            raise
        ckpt = None
    if ckpt is None:
        ckpt = load_safe(previous_path(path))
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(
            f"{path} is not an ibot training checkpoint; to start from its weights use run.init_from={path}"
        )
    return resumable_config(path, ckpt["config"])


def config_from_checkpoint(path: str | Path):
    """The :class:`ibot.config.Config` a training checkpoint was made with."""
    ckpt = load_safe(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"{path} is not an ibot training checkpoint (it has no config)")
    return checkpoint_config(ckpt)


__all__ = [
    "COUNTERS",
    "REQUIRED_KEYS",
    "SCHEDULE_KEYS",
    "STRUCTURAL_KEYS",
    "Checkpointer",
    "config_from_checkpoint",
    "gather_rng_states",
    "resumable_config",
    "resume_config",
    "rng_state",
    "set_rng_state",
]
