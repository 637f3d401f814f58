import json
from pathlib import Path

import pytest
import yaml

from h2t.cli import MetricsLog, main
from models.contract.layout import RunFolder
from tests.helpers import TINY_DATASET, live_descendants, tiny_run_config
from tests.reference_data import CORRUPT

TINY = {"dataset": TINY_DATASET, **tiny_run_config(stage1={"epochs": 2}, stage2={"epochs": 1})}


def _config(tmp_path: Path, body: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_train_writes_metrics_per_epoch_summary_and_checkpoints(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["train", "--config", str(_config(tmp_path, TINY)), "--out", str(out), "--set", "stage2.rho=0.5",
                 "--device", "cpu"])
    assert code == 0
    folder = RunFolder(out)
    rows = [json.loads(line) for line in folder.metrics_log.read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in rows] == [(1, 1), (1, 2), (2, 1)]
    summary = json.loads(folder.summary.read_text())
    assert summary["config"]["stage2"]["rho"] == 0.5 and summary["train_images"] == 489
    assert set(summary["report"]["groups"]) == {"overall", "many", "medium", "few"}
    assert yaml.safe_load(folder.config.read_text())["stage2"]["rho"] == 0.5
    assert folder.checkpoint(1).exists() and folder.checkpoint(2).exists()
    printed = capsys.readouterr().out
    assert "stage 1 epoch   2/2" in printed and "few" in printed.splitlines()[-1]

    # a second stage 2 on the finished stage 1
    code = main(["train", "--config", str(_config(tmp_path, TINY)), "--out", str(tmp_path / "crt"),
                 "--stage1-from", str(out), "--set", "stage2.method=crt", "--set", "stage2.rho=0"])
    assert code == 0
    rows = [json.loads(line) for line in RunFolder(tmp_path / "crt").metrics_log.read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in rows] == [(2, 1)]


def test_train_on_two_cpu_processes_writes_what_one_process_writes(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["train", "--config", str(_config(tmp_path, TINY)), "--out", str(out), "--set", "devices=2",
                 "--device", "cpu"])
    assert code == 0
    folder = RunFolder(out)
    rows = [json.loads(line) for line in folder.metrics_log.read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in rows] == [(1, 1), (1, 2), (2, 1)]
    assert json.loads(folder.summary.read_text())["config"]["devices"] == 2
    assert folder.checkpoint(2).exists()
    printed = capsys.readouterr().out
    assert "training on 2 cpu processes" in printed and "few" in printed.splitlines()[-1]
    assert not live_descendants()


@pytest.mark.parametrize("body, message", [
    ({**TINY, "stage2": {"rho": 2}}, "rho"),
    ({"dataset": {"builtin": "cifar100"}}, "data root|CIFAR"),
])
def test_train_reports_bad_configs_and_missing_data_clearly(tmp_path, capsys, monkeypatch, body, message):
    monkeypatch.setenv("H2T_DATA_ROOT", str(tmp_path / "nowhere"))
    code = main(["train", "--config", str(_config(tmp_path, body)), "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("h2t train: error:") and any(m in err for m in message.split("|"))


def test_metrics_log_replaces_a_replayed_epoch_instead_of_duplicating_it(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"stage": 1, "epoch": 1, "loss": 2.0})
    log.write({"stage": 1, "epoch": 2, "loss": 1.5})
    reopened = MetricsLog(tmp_path / "metrics.jsonl")
    reopened.write({"stage": 1, "epoch": 2, "loss": 1.4})
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["loss"]) for r in lines] == [(1, 2.0), (2, 1.4)]


def test_train_reads_a_dataset_by_reference_relative_to_the_data_root(tmp_path, reference_root, capsys):
    root, tree = reference_root
    body = {"dataset": tree.list_files_spec, **tiny_run_config(stage1={"epochs": 1}, stage2={"epochs": 1})}
    out = tmp_path / "out"
    code = main(["train", "--config", str(_config(tmp_path, body)), "--out", str(out), "--data-root", str(root),
                 "--device", "cpu"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_images"] == sum(tree.train_counts)  # the corrupt file is left out, and said so
    assert [u["path"] for u in summary["unreadable"]] == [f"{tree.folder}/{CORRUPT}"]
    assert f"left out 1 unreadable file(s): {tree.folder}/{CORRUPT}" in capsys.readouterr().out


def test_an_interrupted_train_says_how_to_resume_instead_of_a_traceback(tmp_path, capsys, monkeypatch):
    import models.core.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(models.core.train, "train_two_stage", interrupted)
    code = main(["train", "--config", str(_config(tmp_path, TINY)), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 130 and "run the same command again to resume" in capsys.readouterr().err


def test_shortening_stage1_scales_the_schedule_unless_it_is_set_too(tmp_path):
    from h2t.cli import load_train_config, parse_override

    config_file = Path(__file__).resolve().parents[2] / "configs" / "cifar100_lt_ir100.yaml"
    notes: list[str] = []
    short = load_train_config(config_file, [parse_override("stage1.epochs=20")], notes)
    assert (short.stage1.epochs, short.stage1.warmup_epochs, short.stage1.milestones) == (20, 1, (16, 18))
    assert notes == ["stage1.epochs 200 -> 20: warm-up 5 -> 1 epochs and lr milestones [160, 180] -> [16, 18], "
                     "scaled with it (--set them to choose)"]
    chosen = load_train_config(config_file, [parse_override("stage1.epochs=20"),
                                             parse_override("stage1.milestones=[15]")], notes := [])
    assert (chosen.stage1.warmup_epochs, chosen.stage1.milestones, notes) == (5, (15,), [])


def test_a_run_config_given_only_epochs_scales_the_paper_schedule():
    from models.contract.config import Stage1Config

    assert (Stage1Config(epochs=20).warmup_epochs, Stage1Config(epochs=20).milestones) == (1, (16, 18))
    assert Stage1Config(epochs=400).milestones == (320, 360) and Stage1Config().milestones == (160, 180)
    assert Stage1Config(epochs=20, milestones=[10]).warmup_epochs == 5  # one of them set: the other is the default


def test_demo_local_honours_its_epoch_flags(capsys):
    assert main(["demo", "--local", "--stage1-epochs", "1", "--stage2-epochs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "stage 1 epoch   1/1" in printed and "stage 2 epoch   1/1" in printed and "epoch   2/" not in printed


def test_a_bad_config_is_one_sentence_per_field_without_links(tmp_path, capsys):
    body = {"dataset": TINY_DATASET, "stage1": {"epochs": 0}, "stage2": {"rho": 2}, "bogus": 1}
    assert main(["train", "--config", str(_config(tmp_path, body)), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error == ("h2t train: error: stage1.epochs: Input should be greater than or equal to 1 (got 0); "
                     "stage2.rho: Input should be less than or equal to 1 (got 2); "
                     "bogus: Extra inputs are not permitted (got 1)")
