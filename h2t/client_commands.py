"""`h2t datasets|runs|models|predict`: the service from the command line, through `h2t.client.Client`.

Every verb takes --url/--api-key (else H2T_URL/H2T_API_KEY) and --json (the API's answer as JSON, for
scripts); errors are one line on stderr and the exit codes of `h2t.client` (0 done, 1 the watched run ended
failed or cancelled, 2 refused, 3 API key, 4 not found, 5 service unreachable or failing).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from h2t.client import ApiError, Client
from models.contract.metrics import EpochMetrics, StepProgress
from models.contract.reporting import epoch_line, group_rows_table, pct, progress_line

WATCH_PROGRESS_S = 10.0  # a progress line at most this often while watching


def add_client_commands(commands: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="the service, e.g. http://gpu-host:8000 (default: $H2T_URL, else "
                        "http://127.0.0.1:8000)")
    common.add_argument("--api-key", help="default: $H2T_API_KEY")
    common.add_argument("--json", action="store_true", help="print the API's answer as JSON")

    datasets = commands.add_parser("datasets", help="datasets on a running service").add_subparsers(
        dest="verb", required=True)
    create = datasets.add_parser("create", parents=[common], help="register a builtin set or one by reference")
    create.add_argument("spec", help='a JSON or YAML file, or inline JSON: {"folder": "pets", "image_size": 224}; '
                        'optional "groups": its many/medium/few definition')
    upload = datasets.add_parser("upload", parents=[common], help="upload a zip or tar.gz ImageFolder archive")
    upload.add_argument("archive", type=Path)
    upload.add_argument("--image-size", type=int)
    upload.add_argument("--name")
    upload.add_argument("--groups", type=_json_object, help="its many/medium/few definition as JSON, e.g. "
                        '\'{"many_threshold": 100, "few_threshold": 20}\' (the default) or '
                        '\'{"slices": [[0,3],[3,7],[7,10]]}\'')
    datasets.add_parser("list", parents=[common])
    for verb in ("show", "delete"):
        parser = datasets.add_parser(verb, parents=[common])
        parser.add_argument("id")
        if verb == "delete":
            parser.add_argument("--force", action="store_true", help="also delete the runs on it")

    runs = commands.add_parser("runs", help="training runs on a running service").add_subparsers(
        dest="verb", required=True)
    submit = runs.add_parser("submit", parents=[common], help="queue a run: a run config YAML (as for h2t train, "
                             "its dataset: left out) on a dataset of the service")
    submit.add_argument("config", type=Path)
    submit.add_argument("--dataset", help="the dataset's id (or dataset_id: in the file)")
    submit.add_argument("--stage1-from", help="reuse this succeeded run's stage 1")
    submit.add_argument("--name")
    submit.add_argument("--tag", action="append", default=[])
    submit.add_argument("--watch", action="store_true", help="follow it to its end: progress with ETA, each epoch, "
                        "then the per-group table; exit 1 if it fails or is cancelled")
    listing = runs.add_parser("list", parents=[common])
    for option in ("--status", "--dataset-id", "--method", "--stage1-from", "--name", "--sort"):
        listing.add_argument(option)
    listing.add_argument("--search", help="names containing this text, in any case (--name: exactly this name)")
    listing.add_argument("--tag", action="append", default=[])
    listing.add_argument("--limit", type=int, default=50)
    for verb in ("show", "cancel", "logs", "delete"):
        parser = runs.add_parser(verb, parents=[common])
        parser.add_argument("id")
        if verb in ("cancel", "delete"):
            parser.add_argument("--force", action="store_true", help="cancel: end it at once; delete: also the runs "
                                "reusing its stage 1")
        if verb == "logs":
            parser.add_argument("--follow", action="store_true", help="keep printing until the run ends")

    models = commands.add_parser("models", help="exported models on a running service").add_subparsers(
        dest="verb", required=True)
    models.add_parser("list", parents=[common])
    for verb in ("show", "calibration", "download", "delete"):
        parser = models.add_parser(verb, parents=[common])
        parser.add_argument("id")
        if verb == "download":
            parser.add_argument("-o", "--output", type=Path, help="default: h2t-<id>.onnx")

    imported = models.add_parser("import", parents=[common], help="export, calibrate and upload the model of a "
                                 "folder `h2t train` finished (needs the training extra and the dataset)")
    imported.add_argument("folder", type=Path, help="the --out folder of `h2t train`")
    imported.add_argument("--data-root", type=Path, help="where its dataset lives (default: $H2T_DATA_ROOT)")
    imported.add_argument("--register", metavar="NAME", help="also add it as the next version of this registered "
                          "name (created if new)")

    registry = commands.add_parser("registry", help="registered model names, versions and aliases").add_subparsers(
        dest="verb", required=True)
    registry.add_parser("list", parents=[common])
    for verb, extra in (("show", ()), ("create", ("--description",)), ("delete", ())):
        parser = registry.add_parser(verb, parents=[common])
        parser.add_argument("name")
        for option in extra:
            parser.add_argument(option)
    add = registry.add_parser("add", parents=[common], help="add a model as the next version of NAME")
    add.add_argument("name")
    add.add_argument("model", help="the model's id")
    alias = registry.add_parser("alias", parents=[common], help="point ALIAS of NAME at VERSION (one call)")
    alias.add_argument("name")
    alias.add_argument("alias")
    alias.add_argument("version", type=int)
    unalias = registry.add_parser("unalias", parents=[common])
    unalias.add_argument("name")
    unalias.add_argument("alias")

    predict = commands.add_parser("predict", parents=[common], help="classify image files with a served model")
    predict.add_argument("model", help="a model's id, a registered name, NAME@VERSION or NAME@ALIAS")
    predict.add_argument("files", nargs="+", type=Path)
    predict.add_argument("--top-k", type=int, default=3)

    sweep = commands.add_parser("sweep", parents=[common], help="one stage 1, then a stage 2 per rho value and seed "
                                "started from its checkpoint as soon as it exists")
    sweep.add_argument("config", type=Path, help="the run config YAML of the stage-1 run (as for runs submit)")
    sweep.add_argument("--dataset", help="the dataset's id (or dataset_id: in the file)")
    sweep.add_argument("--rho", type=float, nargs="+", required=True, help="fusion ratios of the stage-2 runs")
    sweep.add_argument("--seed", type=int, nargs="+", default=[0], help="stage-2 seeds (default 0)")
    sweep.add_argument("--name", default="sweep", help="names the runs NAME stage 1, NAME rho=R seed=S")
    sweep.add_argument("--tag", action="append", default=[])
    sweep.add_argument("--watch", action="store_true", help="wait for every run, then print accuracy and calibration "
                       "per rho and seed; exit 1 if any failed")

    for name in ("datasets", "runs", "models", "registry", "predict", "sweep"):
        commands.choices[name].set_defaults(func=client_command)


def client_command(args: argparse.Namespace) -> int:
    try:
        with Client(args.url, args.api_key) as client:
            return _dispatch(client, args)
    except ApiError as exc:
        print(f"h2t {args.command}: error: {exc.detail}", file=sys.stderr)
        return exc.exit_code


def _dispatch(client: Client, args: argparse.Namespace) -> int:
    verb = getattr(args, "verb", None)
    match args.command, verb:
        case "datasets", "create":
            return _show(args, client.create_dataset(_read_mapping(args.spec)), _dataset_line)
        case "datasets", "upload":
            uploaded = client.upload_dataset(args.archive, args.image_size, args.name, args.groups)
            return _show(args, uploaded, _dataset_line)
        case "datasets", "list":
            return _show_list(args, client.datasets(), _dataset_line)
        case "datasets", "show":
            return _show(args, client.dataset(args.id), _dataset_line)
        case "datasets", "delete":
            client.delete_dataset(args.id, args.force)
            return _done(args, f"deleted dataset {args.id}")
        case "runs", "submit":
            return _submit(client, args)
        case "runs", "list":
            return _show_list(args, client.runs(status=args.status, dataset_id=args.dataset_id, method=args.method,
                                                stage1_from=args.stage1_from, name=args.name, tag=args.tag,
                                                search=args.search, sort=args.sort, limit=args.limit), _run_line)
        case "runs", "show":
            return _show(args, client.run(args.id), _run_line)
        case "runs", "cancel":
            return _show(args, client.cancel_run(args.id, args.force), _run_line)
        case "runs", "delete":
            client.delete_run(args.id, args.force)
            return _done(args, f"deleted run {args.id}")
        case "runs", "logs":
            lines = client.follow_logs(args.id) if args.follow else client.logs(args.id).splitlines()
            for line in lines:
                print(line, flush=True)
            return 0
        case "models", "list":
            return _show_list(args, client.models(), _model_line)
        case "models", "show":
            return _show(args, client.model(args.id), _model_line)
        case "models", "calibration":
            report = client.calibration(args.id)
            return _show(args, report, lambda r: json.dumps(r, indent=1))
        case "models", "download":
            path = client.download_model(args.id, args.output or Path(f"h2t-{args.id}.onnx"))
            return _done(args, f"wrote {path}")
        case "models", "delete":
            client.delete_model(args.id)
            return _done(args, f"deleted model {args.id}")
        case "models", "import":
            return _import(client, args)
        case "registry", "list":
            return _show_list(args, client.registered(), _registered_line)
        case "registry", "show":
            return _show(args, client.registered(args.name), _registered_line)
        case "registry", "create":
            return _show(args, client.register(args.name, args.description), _registered_line)
        case "registry", "delete":
            client.unregister(args.name)
            return _done(args, f"removed {args.name} from the registry (its models stay)")
        case "registry", "add":
            return _show(args, client.add_version(args.name, args.model), _registered_line)
        case "registry", "alias":
            return _show(args, client.set_alias(args.name, args.alias, args.version), _registered_line)
        case "registry", "unalias":
            client.remove_alias(args.name, args.alias)
            return _done(args, f"removed alias {args.alias} of {args.name}")
        case "sweep", _:
            return _sweep(client, args)
        case "predict", _:
            answer = client.predict(args.model, args.files, args.top_k)
            if args.json:
                print(json.dumps(answer))
                return 0
            for path, prediction in zip(args.files, answer["predictions"], strict=True):
                best = prediction["predicted"]
                print(f"{path}: {best['label']} ({100 * best['probability']:.1f} %, {best['group']} class)")
            return 0
    raise AssertionError(f"unhandled command {args.command} {verb}")


def _submit(client: Client, args: argparse.Namespace) -> int:
    body = _run_body(args)
    if args.stage1_from:
        body["stage1_from"] = args.stage1_from
    run = client.submit_run(body, args.name, args.tag)
    if not args.watch:
        return _show(args, run, _run_line)
    if not args.json:
        print(f"run {run['id']} {run['status']}", flush=True)
    status, printed_at = run["status"], 0.0
    for kind, data in client.events(run["id"]):
        if args.json:
            continue
        if kind == "status" and data["status"] != status:
            status = data["status"]
            print(f"run {run['id']} {status}", flush=True)
        elif kind == "epoch":
            print(epoch_line(EpochMetrics.model_validate(data)), flush=True)
        elif kind == "progress" and time.monotonic() - printed_at >= WATCH_PROGRESS_S:
            printed_at = time.monotonic()
            print(progress_line(StepProgress.model_validate(data)), flush=True)
    final = client.run(run["id"])
    if args.json:
        print(json.dumps(final))
    elif final["status"] == "succeeded":
        last = client.metrics(run["id"])[-1]
        dataset = client.dataset(final["dataset_id"])
        print(f"\nlast epoch of stage 2 ({dataset['name']}):")
        print(group_rows_table(dataset["groups"], dataset["train_counts"], dataset["test_counts"], {
            "overall": (last["top1"], last["ece"]), "many": (last["many"], last["ece_many"]),
            "medium": (last["medium"], last["ece_medium"]), "few": (last["few"], last["ece_few"])}))
    else:
        print(f"run {run['id']} ended {final['status']}" + (f": {final['error']}" if final["error"] else ""),
              file=sys.stderr)
    return 0 if final["status"] == "succeeded" else 1


SWEEP_POLL_S = 1.0


def _run_body(args: argparse.Namespace) -> dict[str, Any]:
    body = _read_mapping(str(args.config))
    body.pop("dataset", None)  # an h2t train config names its dataset; here the service's dataset is named by id
    if args.dataset:
        body["dataset_id"] = args.dataset
    if "dataset_id" not in body:
        raise ApiError(422, "name the dataset: --dataset ID, or dataset_id: in the file")
    return body


def _sweep(client: Client, args: argparse.Namespace) -> int:
    """The stage-1 run (with its own stage 2), then one stage-2 run per (rho, seed) from its stage-1 checkpoint,
    submitted as soon as its stage 2 has begun (the checkpoint is final then)."""
    body = _run_body(args)
    base = client.submit_run(body, f"{args.name} stage 1", args.tag)
    say = (lambda text: None) if args.json else (lambda text: print(text, flush=True))
    say(f"stage 1: run {base['id']}")
    while True:
        run = client.run(base["id"])
        if run["stage"] == 2 and run["epoch"] >= 1 or run["status"] == "succeeded":
            break
        if run["status"] in ("failed", "cancelled"):
            why = f": {run['error']}" if run["error"] else ""
            raise ApiError(409, f"the stage-1 run {base['id']} ended {run['status']}{why}")
        time.sleep(SWEEP_POLL_S)
    stage2 = dict(body.get("stage2") or {})
    stage2.pop("method", None)  # rho decides: 0 is DR, above 0 is H2T
    submitted = []
    for rho in args.rho:
        for seed in args.seed:
            child = {**body, "seed": seed, "stage1_from": base["id"], "stage2": {**stage2, "rho": rho}}
            run = client.submit_run(child, f"{args.name} rho={rho:g} seed={seed}", [*args.tag, f"rho={rho:g}"])
            submitted.append(run)
            say(f"stage 2, rho {rho:g}, seed {seed}: run {run['id']}")
    if not args.watch:
        if args.json:
            print(json.dumps({"stage1": base["id"], "runs": [r["id"] for r in submitted]}))
        return 0
    finals = []
    for run in [base, *submitted]:
        while (final := client.run(run["id"]))["status"] not in ("succeeded", "failed", "cancelled"):
            time.sleep(SWEEP_POLL_S)
        finals.append(final)
    rows = []
    for final in finals:
        last = client.metrics(final["id"])[-1] if final["status"] == "succeeded" else None
        rows.append({"run": final["id"], "name": final["name"], "status": final["status"],
                     "rho": final["config"]["stage2"]["rho"], "seed": final["config"]["seed"],
                     **({key: last[key] for key in ("top1", "many", "medium", "few", "ece")} if last else {})})
    if args.json:
        print(json.dumps({"stage1": base["id"], "runs": rows}))
    else:
        print(f"\n{'rho':>5} {'seed':>4} {'top-1':>6} {'many':>6} {'medium':>6} {'few':>6} {'ECE':>6}  run")
        for row in sorted(rows, key=lambda r: (r["rho"], r["seed"])):
            figures = " ".join(pct(row[k], 6) for k in ("top1", "many", "medium", "few", "ece")) \
                if "top1" in row else f"{row['status']:>34}"
            print(f"{row['rho']:5g} {row['seed']:4d} {figures}  {row['run']}")
    return 0 if all(row["status"] == "succeeded" for row in rows) else 1


def _read_mapping(source: str) -> dict[str, Any]:
    path = Path(source)
    text = path.read_text() if path.is_file() else source
    try:
        value = yaml.safe_load(text)  # JSON is YAML
    except yaml.YAMLError as exc:
        raise ApiError(422, f"{source} is neither a JSON/YAML file nor inline JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ApiError(422, f"{source} must hold a mapping")
    return value


def _show(args: argparse.Namespace, answer: dict, line: Any) -> int:
    print(json.dumps(answer) if args.json else line(answer))
    return 0


def _show_list(args: argparse.Namespace, answer: dict, line: Any) -> int:
    if args.json:
        print(json.dumps(answer))
    else:
        for item in answer["data"]:
            print(line(item))
        print(f"({len(answer['data'])} of {answer['count']})")
    return 0


def _done(args: argparse.Namespace, message: str) -> int:
    print(json.dumps({"ok": True, "message": message}) if args.json else message)
    return 0


def _registered_line(r: dict) -> str:
    aliases = ", ".join(f"{a['alias']}={a['version']}" for a in r["aliases"])
    return f"{r['name']}  latest {r['latest_version'] or '-'}  {len(r['versions'])} version(s)" + (
        f"  aliases {aliases}" if aliases else "")


def _import(client: Client, args: argparse.Namespace) -> int:
    """Export and calibrate a finished `h2t train` folder here, as a worker does, then upload it."""
    import tempfile

    from models.contract.config import LocalTrainConfig
    from models.core.data import load_dataset
    from models.core.export import export_finished_folder
    from service.store.settings import Settings

    folder = args.folder
    config_file = folder / "config.yaml"
    if not config_file.exists():
        raise ApiError(400, f"{folder} holds no config.yaml: give the --out folder of `h2t train`")
    config = LocalTrainConfig.model_validate(yaml.safe_load(config_file.read_text()))
    dataset = load_dataset(config.dataset, args.data_root or Settings().data_root, augment=config.augment,
                           loader=config.loader, validation=config.validation)
    with tempfile.TemporaryDirectory() as scratch:
        try:
            served = export_finished_folder(folder, config, dataset, Path(scratch) / "model.onnx")
        except (FileNotFoundError, ValueError) as exc:
            raise ApiError(400, str(exc)) from exc
        report = served.calibration
        manifest = {"calibration": report.model_dump(mode="json"),
                    "parity": {"max_abs_diff": served.export.parity_max_abs_diff,
                               "images": served.export.parity_images},
                    "origin": {"kind": "h2t train", "folder": str(folder.resolve()), "dataset": dataset.name,
                               "config": config.model_dump(mode="json")}}
        model = client.import_model(Path(scratch) / "model.onnx", manifest)
    if args.register:
        try:
            client.register(args.register)
        except ApiError as exc:
            if exc.status != 409:  # an existing name gets the next version
                raise
        registered = client.add_version(args.register, model["id"])
        model["registered"] = {"name": args.register, "version": registered["latest_version"]}
    if args.json:
        print(json.dumps(model))
        return 0
    print(f"imported model {model['id']}: top-1 {pct(report.top1)} %, few-shot {pct(report.groups['few'].accuracy)} %"
          + (f"; {args.register} version {model['registered']['version']}" if args.register else ""))
    return 0


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _dataset_line(d: dict) -> str:
    sizes = ", ".join(f"{d['groups'].count(g)} {g}" for g in ("many", "medium", "few")) if d.get("groups") else ""
    line = f"{d['id']}  {d['status']:<8}  {d['name']}  {d.get('num_classes', '')} classes"
    return f"{line} ({sizes})" if sizes else line


def _run_line(r: dict) -> str:
    where = f"stage {r['stage']} epoch {r['epoch']}/{r['total_epochs']}" if r["stage"] else ""
    tags = f"  [{', '.join(r['tags'])}]" if r.get("tags") else ""
    return f"{r['id']}  {r['status']:<10}  {where:<22}  {r.get('name') or ''}{tags}"


def _model_line(m: dict) -> str:
    overall = m.get("calibration", {}).get("overall", {})
    accuracy = f"top-1 {100 * overall['accuracy']:.2f} %" if "accuracy" in overall else ""
    return f"{m['id']}  {accuracy}"
