"""`h2t`: one command for local training, the demo and the service processes."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml
from pydantic import ValidationError

from models.contract.config import (
    PAPER_MILESTONES,
    PAPER_STAGE1_EPOCHS,
    PAPER_WARMUP_EPOCHS,
    LocalTrainConfig,
    scaled_schedule,
    validation_sentence,
)


def parse_override(text: str) -> tuple[list[str], object]:
    """`stage2.rho=0.5` -> (["stage2", "rho"], 0.5); the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set takes KEY=VALUE, got {text!r}")
    return key.split("."), yaml.safe_load(value)


def apply_overrides(raw: dict, overrides: list[tuple[list[str], object]]) -> dict:
    for path, value in overrides:
        node = raw
        for key in path[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {'.'.join(path)}: {key} is not a section")
        node[path[-1]] = value
    return raw


def load_train_config(path: Path, overrides: list[tuple[list[str], object]] = (),
                      notes: list[str] | None = None) -> LocalTrainConfig:
    """The config file with `--set` overrides. Shortening (or lengthening) stage 1 with `--set stage1.epochs=N`
    scales the file's warm-up and lr milestones with it, unless they are set too; `notes` gets what changed."""
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a YAML mapping")
    file_stage1 = dict(raw.get("stage1") or {}) if isinstance(raw.get("stage1") or {}, dict) else {}
    raw = apply_overrides(raw, list(overrides))
    note = _schedule_follows_epochs(file_stage1, raw, {".".join(key) for key, _ in overrides})
    if note and notes is not None:
        notes.append(note)
    return LocalTrainConfig.model_validate(raw)


def _schedule_follows_epochs(file_stage1: dict, raw: dict, overridden: set[str]) -> str | None:
    if "stage1.epochs" not in overridden or overridden & {"stage1.warmup_epochs", "stage1.milestones"}:
        return None
    if "warmup_epochs" not in file_stage1 and "milestones" not in file_stage1:
        return None  # the config's own defaults follow its epochs (Stage1Config)
    stage1, epochs = raw["stage1"], raw["stage1"]["epochs"]
    was = file_stage1.get("epochs", PAPER_STAGE1_EPOCHS)
    warmup = file_stage1.get("warmup_epochs", PAPER_WARMUP_EPOCHS)
    milestones = tuple(file_stage1.get("milestones", PAPER_MILESTONES))
    if not isinstance(epochs, int) or not isinstance(was, int) or epochs < 1 or was < 1 or epochs == was:
        return None
    stage1["warmup_epochs"], stage1["milestones"] = scaled_schedule(was, epochs, warmup, milestones)
    return (f"stage1.epochs {was} -> {epochs}: warm-up {warmup} -> {stage1['warmup_epochs']} epochs and lr milestones "
            f"{list(milestones)} -> {list(stage1['milestones'])}, scaled with it (--set them to choose)")


class MetricsLog:
    """metrics.jsonl keyed by (stage, epoch): an epoch replayed after a crash replaces its line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[tuple[int, int], dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                row = json.loads(line)
                self.rows[(row["stage"], row["epoch"])] = row

    def write(self, row: dict) -> None:
        self.rows[(row["stage"], row["epoch"])] = row
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for _, r in sorted(self.rows.items())))
        os.replace(tmp, self.path)


UNREADABLE_SHOWN = 5  # left-out files `h2t train` names on the console
PROGRESS_PRINT_S = 15.0  # inside an epoch, `h2t train` prints where it stands at most this often


def train_locally(ranks, device, hooks, config, data_root, folder, stage1_from, weights):
    """One rank of `h2t train` on several devices: rank 0's result is the run's."""
    from models.core.data import load_dataset
    from models.core.train import train_two_stage

    dataset = load_dataset(config.dataset, data_root, augment=config.augment, loader=config.loader,
                           validation=config.validation)
    return train_two_stage(dataset, config, folder, device, hooks.on_epoch, stage1_from, hooks.stop_requested, weights,
                           ranks, hooks.on_progress)


def train_command(args: argparse.Namespace) -> int:
    from models.contract.layout import RunFolder
    from models.contract.reporting import epoch_line, group_table, progress_line
    from models.core.data import load_dataset
    from models.core.pretrained import WeightSource
    from models.core.train import resolve_device, train_two_stage
    from service.store.settings import Settings

    notes: list[str] = []
    config = load_train_config(Path(args.config), args.set, notes)
    for note in notes:
        print(note, flush=True)
    folder = RunFolder(Path(args.out)).create()
    folder.config.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    settings = Settings()
    data_root = args.data_root or settings.data_root
    dataset = load_dataset(config.dataset, data_root, download=args.download, augment=config.augment,
                           loader=config.loader, validation=config.validation)
    device = resolve_device(args.device)
    print(f"{dataset.name}: {len(dataset.train)} train / {len(dataset.test)} test images, "
          f"{dataset.num_classes} classes, {'streamed from files' if dataset.streams else 'in memory'}, "
          f"device {device}", flush=True)
    if dataset.val is not None:
        print(f"validation: {len(dataset.val)} images held out for calibration ({dataset.val_source}); "
              f"`h2t models import` fits {config.validation.fitted()} on them", flush=True)
    if dataset.unreadable:
        shown = "; ".join(f"{u.path} ({u.reason})" for u in dataset.unreadable[:UNREADABLE_SHOWN])
        more = len(dataset.unreadable) - UNREADABLE_SHOWN
        print(f"left out {len(dataset.unreadable)} unreadable file(s): {shown}"
              + (f"; and {more} more (all in summary.json)" if more > 0 else ""), flush=True)

    log = MetricsLog(folder.metrics_log)

    def on_epoch(m) -> None:
        log.write(m.model_dump())
        print(epoch_line(m), flush=True)

    printed_at = [time.monotonic()]

    def on_progress(p) -> None:  # a line inside a long epoch, not one per report
        if time.monotonic() - printed_at[0] >= PROGRESS_PRINT_S:
            printed_at[0] = time.monotonic()
            print(progress_line(p), flush=True)

    started = time.perf_counter()
    stage1_from = RunFolder(Path(args.stage1_from)) if args.stage1_from else None
    weights = WeightSource(Path(data_root), settings.allow_weight_download)
    if config.devices == 1:
        result = train_two_stage(dataset, config, folder, device, on_epoch, stage1_from, weights=weights,
                                 on_progress=on_progress)
    else:
        from models.core.launch import TrainingHooks, launch

        print(f"training on {config.devices} {device.type} processes (data-parallel)", flush=True)
        result = launch(config.devices, device.type, train_locally, (config, data_root, folder, stage1_from, weights),
                        TrainingHooks(on_epoch, on_progress))
    if result.pretrained is not None:
        print(result.pretrained.summary(), flush=True)
    counts = dataset.train_counts()
    summary = {
        "dataset": dataset.name, "train_images": len(dataset.train), "test_images": len(dataset.test),
        "train_counts": counts, "groups": result.groups, "device": str(device),
        "unreadable": [{"path": u.path, "reason": u.reason} for u in dataset.unreadable],
        "config": config.model_dump(mode="json"), "stage1_from": args.stage1_from,
        "stage1_last": result.stage1[-1].model_dump() if result.stage1 else None,
        "stage2_last": result.stage2[-1].model_dump(),
        "report": result.report.model_dump(), "wall_seconds": time.perf_counter() - started,
    }
    folder.summary.write_text(json.dumps(summary, indent=1))
    print("\nlast epoch of stage 2 on the test split:")
    print(group_table(result.report, counts, dataset.test_counts(), result.groups))
    return 0


def migrate_command(args: argparse.Namespace) -> int:
    from service.store.migrate import downgrade_to, upgrade_head
    from service.store.settings import Settings

    settings = Settings()
    settings.ensure_local_dirs()
    where = settings.database_url.split("@")[-1]
    if args.downgrade:
        downgrade_to(settings.database_url, args.downgrade)
        print(f"database at {where} is at revision {args.downgrade}")
    else:
        upgrade_head(settings.database_url)
        print(f"database at {where} is at the latest schema")
    return 0


def serve_command(args: argparse.Namespace) -> int:
    import uvicorn

    from service.api.app import create_app
    from service.store.logs import configure_logging
    from service.store.settings import Settings

    configure_logging(args.log_level)
    processes = args.processes or Settings().api_processes
    if processes == 1:
        uvicorn.run(create_app(), host=args.host, port=args.port, log_level=args.log_level.lower(),
                    log_config=None, timeout_graceful_shutdown=10)
        return 0
    # several processes on one port: uvicorn imports the app factory in each (each logs as configured here)
    os.environ["H2T_SERVE_LOG_LEVEL"] = args.log_level
    uvicorn.run("h2t.cli:serving_app", factory=True, workers=processes, host=args.host, port=args.port,
                log_level=args.log_level.lower(), log_config=None, timeout_graceful_shutdown=10)
    return 0


def serving_app():
    """The API of one of several `h2t serve` processes."""
    from service.api.app import create_app
    from service.store.logs import configure_logging

    configure_logging(os.environ.get("H2T_SERVE_LOG_LEVEL", "INFO"))
    return create_app()


def worker_command(args: argparse.Namespace) -> int:
    from service.store.logs import configure_logging
    from service.store.settings import Settings
    from worker.celery_app import run_worker

    configure_logging(args.log_level)
    run_worker(Settings(), args.log_level)
    return 0


def demo_command(args: argparse.Namespace) -> int:
    from h2t.demo import run_local_demo, run_service_demo

    if args.local:
        return run_local_demo(stage1_epochs=args.stage1_epochs, stage2_epochs=args.stage2_epochs)
    return run_service_demo(args.stage1_epochs, args.stage2_epochs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="h2t", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="run both training stages locally (no service)")
    train.add_argument("--config", required=True, help="YAML file: a run config plus `dataset:`")
    train.add_argument("--out", required=True, help="directory for checkpoints, metrics.jsonl, summary.json")
    train.add_argument("--stage1-from", help="reuse the finished stage 1 of this earlier --out directory")
    train.add_argument("--set", action="append", default=[], type=parse_override, metavar="KEY=VALUE",
                       help="override a config field, e.g. --set stage2.rho=0.5 (repeatable)")
    train.add_argument("--data-root", help="folder holding the CIFAR python files and the datasets by "
                       "reference, whose paths are relative to it (default: $H2T_DATA_ROOT, as the service reads it)")
    train.add_argument("--download", action="store_true", help="download CIFAR into the data root if missing")
    train.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present, else cpu)")
    train.set_defaults(func=train_command)

    serve = commands.add_parser("serve", help="run the REST API (configured by H2T_* variables)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--log-level", default="INFO")
    serve.add_argument("--processes", type=int, help="API processes sharing the port (default: $H2T_API_PROCESSES, "
                       "else 1); each keeps its own model cache")
    serve.set_defaults(func=serve_command)

    worker = commands.add_parser("worker", help="run one Celery training worker (one per GPU)")
    worker.add_argument("--log-level", default="INFO")
    worker.set_defaults(func=worker_command)

    migrate = commands.add_parser("migrate", help="upgrade the database to the latest schema (Alembic)")
    migrate.add_argument("--downgrade", metavar="REVISION", help="instead, downgrade to this revision (rollbacks)")
    migrate.set_defaults(func=migrate_command)

    demo = commands.add_parser("demo", help="the whole system (API + worker) on the embedded long-tailed digits")
    demo.add_argument("--local", action="store_true", help="train in this process instead, without the service")
    demo.add_argument("--stage1-epochs", type=int, help="shorten the demo's stage 1 (default 20 epochs)")
    demo.add_argument("--stage2-epochs", type=int, help="shorten the demo's stage 2 (default 10 epochs)")
    demo.set_defaults(func=demo_command)

    from h2t.client_commands import add_client_commands

    add_client_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValidationError as exc:  # one line per wrong field, without pydantic's links
        print(f"h2t {args.command}: error: {validation_sentence(exc)}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        print(f"h2t {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command == "demo":
            print("\nh2t demo: stopped", file=sys.stderr)
            return 130
        if args.command != "train":
            raise
        # every finished epoch is checkpointed: the same command carries on from the last one
        print("\nh2t train: interrupted; run the same command again to resume from the last finished epoch",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
