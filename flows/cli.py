"""`rae`: the command line. Configuration is validated before anything heavy is imported, so
a bad parameter ends the command within seconds (exit code 2, one line)."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from rae_core.errors import ConfigError, RaeError

STAGE_NAMES = ["prepare", "pretrain-encoder", "stats", "extract", "train-decoder", "train-generator",
               "sample", "evaluate"]


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="smoke | tiny | imagenet256 | imagenet512, the VAE + DiT "
                   "family's smoke-vae | tiny-vae | imagenet256-dit, or HART's smoke-hart | "
                   "tiny-hart | imagenet256-hart (default: params.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one parameter, e.g. --set generator.steps=500 (repeatable)")
    p.add_argument("--params", default="params.yaml", help="the active configuration file")


def _experiment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", help="MLflow experiment (default: tracking.experiment of "
                   "params.yaml, or of --preset)")
    p.add_argument("--preset", help="take tracking.experiment from this preset")
    p.add_argument("--params", default="params.yaml", help="the active configuration file")


# One example per command, shown under its --help.
EXAMPLES = {
    "run": "rae run --preset smoke --set generator.steps=200",
    "ablate": "rae ablate --preset smoke --only d,f",
    "stage": "rae stage train-generator --preset tiny",
    "params": "rae params --preset tiny --set sample.scale=2.0",
    "leaderboard": "rae leaderboard --top 5 --format md",
    "runs": "rae runs --limit 5",
    "compare": "rae compare RUN_A RUN_B    (run ids from `rae runs`)",
    "models": "rae models",
    "sample": "rae sample --model models:/rae-generator-digits-32@champion --classes 3,7 "
              "--n 16 --out samples/",
    "reproduce": "rae reproduce --preset smoke",
    "serve": "rae serve --preset tiny",
    "ui": "rae ui --port 5001",
    "sync": "rae sync    (after a run said what its tracking server did not get)",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rae", description="RAE experiment platform")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the whole pipeline as one Prefect flow")
    _config_args(run)
    run.add_argument("--until", choices=STAGE_NAMES, help="stop after this stage")
    run.add_argument("--force", action="append", default=[], choices=STAGE_NAMES,
                     metavar="STAGE", help="run this stage even if it finished under the same "
                     "params, code and inputs (repeatable)")
    ab = sub.add_parser("ablate", help="the paper's key ablations at small scale, with a report")
    _config_args(ab)
    ab.add_argument("--only", metavar="LETTERS", help="comma-separated ablations to run, e.g. "
                    "d,f, with the arms they reuse (default: all)")
    st = sub.add_parser("stage", help="one stage (what dvc.yaml calls)")
    st.add_argument("stage", choices=STAGE_NAMES)
    _config_args(st)
    st.add_argument("--force", action="store_true", help="run it even if it finished under "
                    "the same params, code and inputs")
    pa = sub.add_parser("params", help="write a preset (plus --set) into params.yaml")
    _config_args(pa)
    lb = sub.add_parser("leaderboard", help="the FID leaderboard from MLflow")
    lb.add_argument("--top", type=int, default=10)
    lb.add_argument("--format", choices=["table", "json", "md"], default="table")
    _experiment_args(lb)
    rn = sub.add_parser("runs", help="recent pipeline runs: status, preset, commit, wall time, "
                        "FID")
    rn.add_argument("--limit", type=int, default=20)
    rn.add_argument("--format", choices=["table", "json"], default="table")
    cp = sub.add_parser("compare", help="two runs' differing params and their metrics side "
                        "by side (a pipeline run brings its stages' metrics)")
    cp.add_argument("run_a", metavar="RUN_A", help="an MLflow run id (see `rae runs`)")
    cp.add_argument("run_b", metavar="RUN_B")
    cp.add_argument("--format", choices=["table", "json"], default="table")
    _experiment_args(rn)
    sub.add_parser("models", help="registered model configs with parameter counts")
    sa = sub.add_parser("sample", help="PNG images from a registered generator")
    sa.add_argument("--model", required=True, metavar="MODEL_URI",
                    help="models:/NAME@ALIAS, models:/NAME/VERSION or a model folder")
    sa.add_argument("--classes", metavar="LABELS", help="comma-separated class labels, "
                    "taken in turn (default: every class)")
    sa.add_argument("--n", type=int, default=16, help="number of images (default: 16)")
    sa.add_argument("--out", type=Path, default=Path("samples"), metavar="DIR",
                    help="output folder (default: samples)")
    sa.add_argument("--seed", type=int, help="default: the model's sample.seed")
    sa.add_argument("--guidance", type=float, help="guidance scale (default: the model's "
                    "sample.scale)")
    rp = sub.add_parser("reproduce", help="re-run a pinned preset from scratch and compare "
                        "its metrics with the recorded baseline (fails on drift)")
    rp.add_argument("--preset", default="smoke", help="the pinned preset (default: smoke)")
    rp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    sv = sub.add_parser("serve", help="serve the scheduled deployments")
    _config_args(sv)
    ui = sub.add_parser("ui", help="MLflow UI on 127.0.0.1")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    sub.add_parser("sync", help="log what runs could not log while their tracking server was "
                   "down (runs/tracking/), into the same runs")
    for name, command in sub.choices.items():
        if name in EXAMPLES:
            command.formatter_class = argparse.RawDescriptionHelpFormatter
            command.epilog = f"example:\n  {EXAMPLES[name]}"
    return p


def _load(args):
    from rae_core.presets import load_config
    from rae_core.validate import check_registries

    cfg = load_config(args.params, args.preset, args.overrides)
    check_registries(cfg)
    return cfg


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAE_T0", str(time.time()))
    args = parser().parse_args(argv)
    root = Path.cwd()
    from flows.env import configure

    configure(root)  # logging as well: flows/logging.yml, applied when Prefect is imported
    try:
        if args.command == "stage":  # one driver process runs a project's stages (dvc repro)
            from flows import driver

            if (rc := driver.hand_over(sys.argv[1:] if argv is None else argv, root)) is not None:
                return rc
        return _dispatch(args, root)
    except ConfigError as e:
        print(f"rae: error: {e}", file=sys.stderr)
        return 2
    except RaeError as e:
        print(f"rae: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - Ray/Prefect wrap stage errors; show their cause
        from flows.pipeline import one_line

        line = one_line(e)
        print(f"rae: error: {line}", file=sys.stderr)
        return 2 if "ConfigError" in type(e).__name__ else 1


def _dispatch(args, root: Path) -> int:
    if args.command == "params":
        return _write_params(args, root)
    if args.command == "leaderboard":
        from flows.leaderboard import render, rows

        print(render(rows(args.experiment or _experiment(args)), args.top, args.format))
        return 0
    if args.command == "runs":
        from flows.history import pipeline_runs, render_runs

        print(render_runs(pipeline_runs(args.experiment or _experiment(args), args.limit),
                          args.format))
        return 0
    if args.command == "compare":
        from flows.history import compare_runs, render_comparison

        print(render_comparison(compare_runs(args.run_a, args.run_b), args.run_a, args.run_b,
                                args.format))
        return 0
    if args.command == "sync":
        from flows.tracking import sync

        print("\n".join(sync(root)))
        return 0
    if args.command == "models":
        from rae_core.validate import model_table

        print(model_table())
        return 0
    if args.command == "sample":
        from flows.pyfunc_model import sample_folder

        print(sample_folder(args.model, args.classes, args.n, args.out, args.seed,
                            args.guidance))
        return 0
    if args.command == "ui":
        mlflow = venv_tool("mlflow")
        os.execv(mlflow, [mlflow, "ui", "--backend-store-uri", os.environ["MLFLOW_TRACKING_URI"],
                          "--host", args.host, "--port", str(args.port)])
    if args.command == "reproduce":
        from rae_core.presets import load_config

        load_config(None, args.preset, args.overrides)  # a bad preset or key fails here, fast
        from flows.reproduce import reproduce_flow

        reproduce_flow(args.preset, str(root), args.overrides)
        return 0
    cfg = _load(args)
    if args.command == "serve":
        from flows.scheduled import serve

        serve(cfg, root)
        return 0
    if args.command == "ablate":
        from rae_core.ablations import make_plan, parse_only

        letters = parse_only(args.only)
        make_plan(cfg, letters)  # every arm's configuration is validated before anything starts
        from flows.ablate import ablate_flow

        print(f"wrote {ablate_flow(cfg.to_dict(), str(root), letters)}")
        return 0
    from rae_core.locking import project_lock

    what = "rae run" if args.command == "run" else f"rae stage {args.stage}"
    with project_lock(root, what):  # refuse a second writer before the slow imports
        stages = _to_run(args, cfg, root)
        if not stages:
            return 0
        from rae_core.validate import preflight

        preflight(cfg, root, stages)  # bad data or weights: one line, before any server starts
        from flows.services import attach, watch_ray_head

        # the Prefect and Ray an earlier run left, or new ones booting while this process
        # imports the flows and opens the tracking store
        services_ready = attach(args.command, root, cfg, wait=False)
        t0 = time.time()
        from flows import tracking
        from flows.pipeline import pipeline_flow, stage_flow

        tracking.experiment_id(cfg, root)
        logging.getLogger(__name__).info("rae: imports and tracking store took %.1f s",
                                         time.time() - t0)
        services_ready()
        watch_ray_head(_ray_head_lost)
        if args.command == "run":
            pipeline_flow(cfg, str(root), args.until, args.force)
        else:
            stage_flow(args.stage, cfg, str(root), args.force)
    return 0


def _ray_head_lost(address: str) -> None:
    """The run cannot go on without its Ray head: say so in one line and stop now. The finished
    stages' records and the checkpoints are on disk; the unfinished MLflow runs are continued
    by the next attempt."""
    from flows import driver, services

    print(services.ray_head_lost_line(address), file=sys.stderr, flush=True)

    driver.ending(1)
    os._exit(1)


def _to_run(args, cfg, root: Path) -> list[str]:
    """The stages asked for that have to run. None, after saying so stage by stage, when every
    one finished under this configuration, code and inputs: then neither Prefect, Ray nor
    MLflow need to start. A stage run on its own whose inputs another configuration made is
    refused here (DataError)."""
    from rae_core import provenance
    from rae_core.paths import Paths

    if args.command == "run":
        names = STAGE_NAMES[: STAGE_NAMES.index(args.until) + 1] if args.until else STAGE_NAMES
        forced = set(args.force)
    else:
        names, forced = [args.stage], {args.stage} if args.force else set()
    paths = Paths.at(root)
    if args.command == "stage":  # an input of another configuration: refused before any server
        import shlex

        given = ["--preset", args.preset] if args.preset else []
        given += [f"--set {shlex.quote(o)}" for o in args.overrides]
        if args.params != "params.yaml":
            given += ["--params", shlex.quote(args.params)]
        provenance.check_inputs(args.stage, cfg, paths, given)
    decisions = [provenance.decide(n, cfg, paths, n in forced) for n in names]
    if any(d.run for d in decisions):
        return [n for n, d in zip(names, decisions, strict=True) if d.run]
    for d in decisions:
        print(d.line())
    print("nothing to run: every stage is finished (--force STAGE runs one again)")
    return []


def _experiment(args) -> str:
    from rae_core.presets import load_config

    return load_config(args.params, args.preset).tracking.experiment


def venv_tool(name: str) -> str:
    """A console script of the environment `rae` runs in, whether or not it is on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise RaeError(f"{name}: not installed beside {sys.executable} nor on PATH; "
                       "run `make install`")
    return found


def _write_params(args, root: Path) -> int:
    import yaml

    from rae_core.config import from_dict
    from rae_core.presets import load_config, preset_yaml

    name = args.preset or "tiny"
    cfg = load_config(None, name, args.overrides)
    from rae_core.validate import check_registries

    check_registries(cfg)
    text = preset_yaml(name) if not args.overrides else \
        preset_yaml(name).split("\n", 2)[0] + "\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    from_dict(yaml.safe_load(text))
    path = root / args.params
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    print(f"wrote {path} (preset {name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
