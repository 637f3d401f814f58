"""Data-parallel training on CPU processes (gloo, 2 ranks): each rank's share of a step trains what one device
trains, and the supervisor ends every rank on a stop, a failure or a kill, leaving no process behind."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from models.contract.config import BuiltinDataset, LoaderConfig, RunConfig
from models.contract.layout import RunFolder
from models.contract.metrics import EpochMetrics
from models.core.backbones import build_classifier
from models.core.data import Dataset, digits_long_tailed
from models.core.launch import RankFailed, RankLost, TrainingHooks, launch
from models.core.ranks import SINGLE, Ranks, shard_positions
from models.core.source import source_for
from models.core.stages import Stage1Recipe, Stage2Recipe
from models.core.train import TrainingInterrupted, data_parallel, epoch_generator, train_epoch, train_two_stage
from tests.helpers import TINY_DATASET, live_descendants, tiny_run_config

CPU = torch.device("cpu")
CONFIG = RunConfig.model_validate(tiny_run_config(precision="fp32", stage2={"rho": 0.5}))


def _digits() -> Dataset:
    return digits_long_tailed(BuiltinDataset.model_validate(TINY_DATASET))


class _FirstAndLastSteps:
    """A recipe trained on the first step of its epoch and the last, smaller one (shares of 16 + 16 images,
    then of an odd number): a few steps, so float noise stays far below what a wrong gradient would change."""

    def __init__(self, recipe: Stage1Recipe | Stage2Recipe) -> None:
        self.recipe = recipe

    def __getattr__(self, name: str) -> object:
        return getattr(self.recipe, name)

    def draw_epoch(self, *args: object) -> list:
        steps = self.recipe.draw_epoch(*args)
        return [steps[0], steps[-1]]


def _two_steps_with_frozen_statistics(ranks: Ranks, device: torch.device, hooks: TrainingHooks,
                                      stage: int) -> dict[str, torch.Tensor]:
    dataset = _digits()
    torch.manual_seed(0)
    model = build_classifier("resnet32", dataset.num_classes)
    with torch.no_grad():  # running statistics of unit-variance inputs, so the network in eval mode stays finite
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = 1.0
        model(torch.randn(256, 3, dataset.image_size, dataset.image_size, generator=torch.Generator().manual_seed(0)))
    recipe = _FirstAndLastSteps(Stage1Recipe(CONFIG.stage1) if stage == 1 else Stage2Recipe(CONFIG.stage2))
    optimizer = torch.optim.SGD(recipe.trained_parameters(model), lr=0.01, momentum=0.9, weight_decay=5e-4)
    net = recipe.training_module(model)
    if ranks.parallel:
        net = data_parallel(net, device)
    # BatchNorm normalises with its running statistics: the one thing a device's share changes is held fixed
    model.eval()
    train_epoch(model, source_for(dataset, CONFIG, device), recipe, optimizer, epoch_generator(0, stage, 0), None,
                ranks, net)
    return {name: value.clone() for name, value in model.state_dict().items()}


@pytest.mark.parametrize("stage", [1, 2], ids=["stage1-mixup", "stage2-h2t-fusion"])
def test_two_ranks_sharing_each_step_train_the_weights_one_device_trains(stage):
    assert len(_digits().train) % CONFIG.stage1.batch_size % 2 == 1  # the last step splits unevenly
    one = _two_steps_with_frozen_statistics(SINGLE, CPU, TrainingHooks(), stage)
    two = launch(2, "cpu", _two_steps_with_frozen_statistics, (stage,))
    for name in one:
        assert torch.allclose(one[name].float(), two[name].float(), rtol=1e-4, atol=1e-6), name


def test_shares_of_a_step_cover_it_once_and_differ_by_at_most_one_image():
    shares = [shard_positions(11, Ranks(rank, 3)) for rank in range(3)]
    assert torch.equal(torch.cat(shares), torch.arange(11)) and [len(s) for s in shares] == [4, 4, 3]
    with pytest.raises(ValueError, match="cannot be shared by 4 devices"):
        shard_positions(3, Ranks(0, 4))


def _two_stages(ranks: Ranks, device: torch.device, hooks: TrainingHooks, folder: str,
                config: RunConfig) -> list[EpochMetrics]:
    result = train_two_stage(_digits(), config, RunFolder(Path(folder)), device, hooks.on_epoch, None,
                             hooks.stop_requested, ranks=ranks, on_progress=hooks.on_progress)
    return result.stage1 + result.stage2


LOSS_TOLERANCE = 0.15  # relative, per epoch: each device normalises its 16 of the batch's 32 images


def test_a_two_rank_run_reports_the_one_device_epochs_with_its_loss_curve(tmp_path):
    one = _two_stages(SINGLE, CPU, TrainingHooks(), str(tmp_path / "one"), CONFIG)
    reported: list[EpochMetrics] = []
    two = launch(2, "cpu", _two_stages, (str(tmp_path / "two"), CONFIG), TrainingHooks(on_epoch=reported.append))
    assert [(m.stage, m.epoch, m.epochs) for m in reported] == [(m.stage, m.epoch, m.epochs) for m in one]
    assert reported == two  # rank 0's history is what it reported
    for a, b in zip(one, two, strict=True):
        assert abs(a.loss - b.loss) <= LOSS_TOLERANCE * a.loss, (a.stage, a.epoch, a.loss, b.loss)
    assert not live_descendants()


def test_a_stop_request_ends_every_rank_after_one_checkpoint_and_the_rest_resumes(tmp_path):
    folder = str(tmp_path / "run")
    reported: list[EpochMetrics] = []
    stop = threading.Event()

    def on_epoch(metrics: EpochMetrics) -> None:
        reported.append(metrics)
        stop.set()

    with pytest.raises(TrainingInterrupted, match="after epoch 1 of stage 1"):
        launch(2, "cpu", _two_stages, (folder, CONFIG), TrainingHooks(on_epoch, stop_requested=stop.is_set))
    assert not live_descendants()
    assert [(m.stage, m.epoch) for m in reported] == [(1, 1)]
    resumed = launch(2, "cpu", _two_stages, (folder, CONFIG))
    assert [(m.stage, m.epoch) for m in resumed] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2)]


def _raise_on_rank_1(ranks: Ranks, device: torch.device, hooks: TrainingHooks) -> None:
    torch.distributed.barrier()
    if ranks.rank == 1:
        raise OSError("disk gone")
    torch.distributed.barrier()  # rank 0 waits here for a rank that will never come


def test_a_rank_that_raises_fails_the_run_with_its_message_and_ends_the_others():
    started = time.monotonic()
    with pytest.raises(RankFailed, match="rank 1: OSError: disk gone"):
        launch(2, "cpu", _raise_on_rank_1, ())
    assert time.monotonic() - started < 60 and not live_descendants()


def _wait_to_be_killed(ranks: Ranks, device: torch.device, hooks: TrainingHooks, folder: str) -> None:
    Path(folder, f"rank-{ranks.rank}.pid").write_text(str(os.getpid()))
    torch.distributed.barrier()
    time.sleep(600)


def test_a_killed_rank_ends_the_others_within_seconds_and_leaves_no_process(tmp_path):
    killed_at: list[float] = []

    def kill_rank_1() -> None:
        pid_file = tmp_path / "rank-1.pid"
        while not pid_file.exists():
            time.sleep(0.05)
        time.sleep(0.5)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        killed_at.append(time.monotonic())

    killer = threading.Thread(target=kill_rank_1)
    killer.start()
    with pytest.raises(RankLost, match="rank 1 was killed by signal 9") as lost:
        launch(2, "cpu", _wait_to_be_killed, (str(tmp_path),))
    ended_at = time.monotonic()
    killer.join()
    assert lost.value.exitcode == -signal.SIGKILL
    assert not live_descendants() and ended_at - killed_at[0] < 5


def test_sync_batchnorm_on_cpu_processes_fails_with_a_clear_message(tmp_path):
    config = CONFIG.model_copy(update={"sync_batchnorm": True})
    with pytest.raises(RankFailed, match="sync_batchnorm needs CUDA devices"):
        launch(2, "cpu", _two_stages, (str(tmp_path / "run"), config))
    assert not live_descendants()


def _files_two_stages(ranks: Ranks, device: torch.device, hooks: TrainingHooks, root: str, folder: str,
                      loader: LoaderConfig) -> dict[str, torch.Tensor]:
    from tests.unit.test_streaming import _load

    config = RunConfig.model_validate(tiny_run_config(precision="fp32", loader=loader.model_dump(),
                                                      stage1={"epochs": 2}, stage2={"epochs": 1, "rho": 0.5}))
    result = train_two_stage(_load(Path(root), loader), config, RunFolder(Path(folder)), device, hooks.on_epoch, None,
                             hooks.stop_requested, ranks=ranks)
    return {name: value.clone() for name, value in result.model.state_dict().items()}


def test_two_ranks_streaming_from_files_train_what_two_ranks_train_in_memory(tmp_path):
    from tests.unit.test_streaming import _write_png_tree

    _write_png_tree(tmp_path)
    streamed = launch(2, "cpu", _files_two_stages, (str(tmp_path), str(tmp_path / "streamed"),
                                                    LoaderConfig(mode="streaming", workers=1)))
    held = launch(2, "cpu", _files_two_stages, (str(tmp_path), str(tmp_path / "held"), LoaderConfig(mode="memory")))
    assert all(torch.equal(streamed[name], held[name]) for name in held)
    assert not live_descendants()


def test_the_run_reports_the_raising_rank_not_a_peer_that_lost_its_connection():
    from models.core.launch import RankFailed, root_cause

    peer = RankFailed(0, "RuntimeError", "[gloo/transport/tcp/pair.cc:545] Read error: Connection reset by peer", "")
    cause = RankFailed(1, "OSError", "disk gone", "")
    assert str(root_cause({0: peer, 1: cause})) == "rank 1: OSError: disk gone"
    assert str(root_cause({0: peer})) == str(peer)  # with nothing better, the first
    lost = RankFailed(0, "RankLost", "training process of rank 0 was killed by signal 9", "", secondary=True)
    assert root_cause({0: lost, 1: cause}) is cause
