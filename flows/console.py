"""What a user sees in the terminal: a line as each stage starts and one as it ends (wall time
and its key figure), progress bars, and where to look once a run is done.

Logs do not come here: the console shows their warnings and errors only, the Prefect run's
logs everything at INFO (flows/logging.yml).
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

if TYPE_CHECKING:  # this module is loaded with the logging configuration: keep it light
    from rae_core.config import Config
    from rae_core.paths import Paths


def _wall(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


def _figure(name: str, out: dict) -> str:
    """The one number (or two) a stage is judged by."""
    if out.get("skipped"):
        return "skipped" + (f": {out['reason']}" if out.get("reason") else "")
    if name == "prepare":
        return (f"{out['train_images']} train / {out['val_images']} val images, "
                f"{out['classes']} classes")
    if name == "pretrain-encoder":  # an MAE's loss, or the autoencoder it trained
        return _loss(out["final_mae_loss"]) if "final_mae_loss" in out else \
            f"val PSNR {out['val_psnr']:.2f} dB"
    if name == "stats":
        return f"statistics of {out['count']} latents"
    if name == "extract":
        reused = f" ({out['reused_shards']} kept)" if out.get("reused_shards") else ""
        return f"{out['images']} images in {out['shards']} shards{reused}"
    if name == "train-decoder":
        return f"val PSNR {out['val_psnr']:.2f} dB"
    if name == "train-generator":
        return _loss(out["final_loss"])
    if name == "sample":
        return f"{out['images']} images, {out['images_per_s']:.1f} images/s"
    if name == "evaluate":
        accuracy = f", class accuracy {out['class_accuracy']:.1%}" \
            if "class_accuracy" in out else ""
        return f"FID {out['fid']:.2f}{accuracy}"
    return ""


def _loss(value: float) -> str:
    # a loop resumed at its last step trains no step, and has no loss to report
    return "no steps left to train" if math.isnan(value) else f"final loss {value:.4f}"


def stage_line(name: str, out: dict) -> str:
    """e.g. `✓ evaluate  9.8 s  FID 130.18, class accuracy 8.8%`."""
    parts = [f"✓ {name}", _wall(out["wall_s"]), _figure(name, out)]
    if out.get("resumed_at"):
        parts.append(f"(resumed at step {out['resumed_at']})")
    return "  ".join(p for p in parts if p)


def say(line: str) -> None:
    """A line on stdout, above the bars of the stages still running."""
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def stage_started(name: str) -> None:
    say(f"▶ {name}")


def stage_finished(name: str, out: dict) -> None:
    say(stage_line(name, out))


def _shown(path: Path) -> str:
    """A path as the user would type it: relative to where they are, when it is below."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def next_steps(paths: Paths, wall_s: float) -> str:
    """Where to look once a run is done."""
    rows = [("rae leaderboard", "the FID leaderboard")]
    grid = paths.samples_dir / "grid.png"
    if grid.exists():
        rows.append((_shown(grid), "the sample grid"))
    rows.append(("rae ui", "the MLflow UI: runs, curves, sample grids, registered models"))
    width = max(len(r[0]) for r in rows)
    return "\n".join([f"Done in {_wall(wall_s)}. Next:"] +
                     [f"  {what:<{width}}  {why}" for what, why in rows])


def run_finished(paths: Paths, wall_s: float) -> None:
    say(next_steps(paths, wall_s))


def progress(total: int | None, desc: str, unit: str = "it") -> tqdm:
    """A bar on stderr, shown only where stderr is a terminal (never in a log file), gone
    once it closes: the stage's line says how it ended."""
    return tqdm(total=total, desc=desc, unit=unit, disable=None, leave=False, file=sys.stderr,
                dynamic_ncols=True)


def training_steps(name: str, cfg: Config) -> int | None:
    """The steps a training stage is configured to run (the length of its bar)."""
    return {"pretrain-encoder": cfg.encoder.pretrain.steps, "train-decoder": cfg.decoder.steps,
            "train-generator": cfg.generator.steps}.get(name)


class Unactionable(logging.Filter):
    """Drops warnings about choices the platform made on purpose, which a user cannot act on."""

    MESSAGES = (
        # flows/tracking.register logs with serialization_format="pickle": torch.export
        # ("pt2") fails for some of the models
        "Saving pytorch model by Pickle",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.MESSAGES)

