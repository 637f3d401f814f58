import asyncio
import io
import json
import re

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from models.contract.config import BuiltinDataset, RunConfig, ValidationConfig
from models.contract.layout import RunFolder
from models.contract.metrics import class_groups, evaluate_predictions
from models.contract.onnx_model import (
    BoundRunner,
    ModelSpec,
    decode_image,
    evaluate_onnx,
    load_session,
    run_probabilities,
    session_spec,
)
from models.core.backbones import build_classifier
from models.core.data import digits_long_tailed, load_dataset
from models.core.export import export_and_calibrate, export_finished_folder, export_onnx
from models.core.train import load_checkpoint, train_two_stage
from service.api.models_api.runtime import ModelCache
from tests.helpers import TINY_DATASET, tiny_run_config


@pytest.fixture(scope="module")
def digits():
    return digits_long_tailed(BuiltinDataset.model_validate(TINY_DATASET))


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    config = RunConfig.model_validate(tiny_run_config(stage2={"epochs": 1}))
    return train_two_stage(digits, config, RunFolder(tmp_path_factory.mktemp("run")), torch.device("cpu"))


def _spec(data, groups, size=None) -> ModelSpec:
    return ModelSpec(size or data.image_size, data.mean, data.std, data.class_names, tuple(groups))


def test_resnet32_onnx_matches_torch_within_1e4_on_real_test_images(digits, trained, tmp_path):
    result = export_onnx(
        trained.model, _spec(digits, trained.groups), tmp_path / "m.onnx", digits.test.images.numpy()[:128]
    )
    assert result.parity_images == 128 and result.parity_max_abs_diff < 1e-4
    probs = run_probabilities(load_session(result.path), digits.test.images.numpy()[:5].astype(np.float32) / 255)
    assert probs.max() > 0.5  # a trained model, not a near-uniform one


def test_torchvision_resnet_onnx_matches_torch_within_1e4(digits, tmp_path):
    torch.manual_seed(0)
    model = build_classifier("resnet18", digits.num_classes)
    with torch.no_grad():  # confident logits, so the comparison is not of near-uniform outputs
        model.head.fc.weight.mul_(20)
        model.train()
        model(torch.randn(64, 3, 32, 32))  # give BatchNorm non-trivial running statistics
    images = torch.nn.functional.interpolate(digits.test.images[:64].float(), size=32).to(torch.uint8).numpy()
    groups = class_groups(digits.train_counts())
    result = export_onnx(model.eval(), _spec(digits, groups, size=32), tmp_path / "r18.onnx", images)
    assert result.parity_max_abs_diff < 1e-4


def test_export_records_the_preprocessing_contract_and_takes_any_batch_size(digits, trained, tmp_path):
    spec = _spec(digits, trained.groups)
    result = export_onnx(trained.model, spec, tmp_path / "m.onnx", digits.test.images.numpy()[:4])
    session = load_session(result.path)
    assert session_spec(session) == spec
    assert session.get_inputs()[0].shape[0] == "batch"
    for n in (1, 7):
        assert run_probabilities(session, np.random.rand(n, 3, 16, 16).astype(np.float32)).shape == (n, 10)
    onnx.checker.check_model(onnx.load(str(result.path)))
    import hashlib

    assert result.sha256 == hashlib.sha256(result.path.read_bytes()).hexdigest()


def test_io_bound_runs_from_the_reused_host_buffer_equal_plain_session_runs(digits, trained, tmp_path):
    """The GPU serving path (IO binding, a reused host buffer, chunks of the buffer's size) checked on the CPU
    provider: the same probabilities as `session.run` for batches smaller than, equal to and larger than it."""
    result = export_onnx(trained.model, _spec(digits, trained.groups), tmp_path / "m.onnx",
                         digits.test.images.numpy()[:4])
    session = load_session(result.path)
    runner = BoundRunner(session, 16, max_images=8)
    assert runner.device == "cpu" and not runner.pinned  # nothing to page-lock without a GPU
    images = digits.test.images.numpy()[:21].astype(np.float32) / 255
    for n in (1, 8, 21):
        np.testing.assert_array_equal(runner(images[:n]), session.run(None, {"image": images[:n]})[0])
    np.testing.assert_array_equal(runner(images[:3]), run_probabilities(session, images[:3]))  # buffer reused


def test_the_api_loads_sessions_with_the_configured_inference_threads(digits, trained, tmp_path):
    result = export_onnx(trained.model, _spec(digits, trained.groups), tmp_path / "m.onnx",
                         digits.test.images.numpy()[:4])
    for threads in (1, 2):
        session = ModelCache._load(result.path, result.sha256, threads)
        assert session.get_session_options().intra_op_num_threads == threads


def test_a_calibrated_export_answers_the_torch_side_temperature_scaled_probabilities(digits, trained, tmp_path):
    temperatures = np.linspace(0.5, 3.0, digits.num_classes).astype(np.float32)
    images = digits.test.images.numpy()[:64]
    result = export_onnx(trained.model, _spec(digits, trained.groups), tmp_path / "m.onnx", images, temperatures)
    with torch.no_grad():
        model = trained.model.cpu().float().eval()
        mean, std = torch.tensor(digits.mean).view(1, 3, 1, 1), torch.tensor(digits.std).view(1, 3, 1, 1)
        logits = model((torch.from_numpy(images).float() / 255 - mean) / std)
        expected = torch.softmax(logits / torch.from_numpy(temperatures)[logits.argmax(1)][:, None], 1).numpy()
    served = run_probabilities(load_session(result.path), images.astype(np.float32) / 255)
    np.testing.assert_allclose(served, expected, atol=1e-5)
    assert np.array_equal(served.argmax(1), logits.argmax(1).numpy())
    assert result.parity_max_abs_diff < 1e-5
    metadata = onnx.load(str(result.path)).metadata_props
    assert json.loads({p.key: p.value for p in metadata}["h2t.temperatures"]) == pytest.approx(temperatures.tolist())


def test_export_with_a_validation_split_fits_temperatures_there_and_reports_before_and_after(digits, trained,
                                                                                            tmp_path):
    held = load_dataset(BuiltinDataset.model_validate(TINY_DATASET), validation=ValidationConfig())
    served = export_and_calibrate(trained.model, held, trained.groups, tmp_path / "m.onnx",
                                  validation=ValidationConfig(calibration="group"))
    fit = served.calibration.calibration_fit
    assert fit.level == "group" and fit.validation_images == len(held.val) and "left out" in fit.validation
    assert fit.logit_adjustment_tau is None
    assert set(fit.temperatures) == {"overall", "many", "medium", "few"}
    assert set(fit.test_before) == set(served.calibration.groups)
    before, after = fit.test_before["overall"], served.calibration.groups["overall"]
    assert before.accuracy == pytest.approx(after.accuracy)  # temperatures never change a prediction
    assert all(g.classwise_ece is not None for g in served.calibration.groups.values() if g.n)
    uncalibrated = export_and_calibrate(trained.model, held, trained.groups, tmp_path / "u.onnx")
    assert uncalibrated.calibration.calibration_fit is None
    assert uncalibrated.calibration.groups["overall"].ece == pytest.approx(before.ece)


def test_a_logit_adjusted_export_subtracts_the_offsets_before_the_temperatures(digits, trained, tmp_path):
    temperatures = np.linspace(0.5, 3.0, digits.num_classes).astype(np.float32)
    offsets = np.linspace(-4.0, 4.0, digits.num_classes).astype(np.float32)  # large enough to move predictions
    images = digits.test.images.numpy()[:64]
    result = export_onnx(trained.model, _spec(digits, trained.groups), tmp_path / "m.onnx", images, temperatures,
                         offsets)
    with torch.no_grad():
        model = trained.model.cpu().float().eval()
        mean, std = torch.tensor(digits.mean).view(1, 3, 1, 1), torch.tensor(digits.std).view(1, 3, 1, 1)
        plain = model((torch.from_numpy(images).float() / 255 - mean) / std)
        logits = plain - torch.from_numpy(offsets)
        expected = torch.softmax(logits / torch.from_numpy(temperatures)[logits.argmax(1)][:, None], 1).numpy()
    served = run_probabilities(load_session(result.path), images.astype(np.float32) / 255)
    np.testing.assert_allclose(served, expected, atol=1e-5)
    assert not np.array_equal(served.argmax(1), plain.argmax(1).numpy())  # the adjustment moved some predictions
    metadata = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
    assert json.loads(metadata["h2t.logit_offsets"]) == pytest.approx(offsets.tolist())


def test_export_with_logit_adjustment_fits_tau_on_the_validation_split_and_stores_the_offsets(digits, trained,
                                                                                             tmp_path):
    held = load_dataset(BuiltinDataset.model_validate(TINY_DATASET), validation=ValidationConfig())
    served = export_and_calibrate(trained.model, held, trained.groups, tmp_path / "m.onnx",
                                  validation=ValidationConfig(calibration="overall", logit_adjustment=True))
    fit = served.calibration.calibration_fit
    assert fit.logit_adjustment_tau is not None and -1.0 <= fit.logit_adjustment_tau <= 2.0
    metadata = {p.key: p.value for p in onnx.load(str(served.export.path)).metadata_props}
    assert "h2t.logit_offsets" in metadata and "h2t.temperatures" in metadata
    only_adjusted = export_and_calibrate(trained.model, held, trained.groups, tmp_path / "a.onnx",
                                         validation=ValidationConfig(calibration="none", logit_adjustment=True))
    assert only_adjusted.calibration.calibration_fit.temperatures == {}
    names = {p.key for p in onnx.load(str(only_adjusted.export.path)).metadata_props}
    assert "h2t.logit_offsets" in names and "h2t.temperatures" not in names


def test_exporting_a_folder_refuses_a_missing_or_unfinished_stage_2_and_says_how_to_finish_it(digits, tmp_path):
    config = RunConfig.model_validate(tiny_run_config(stage2={"epochs": 1}))
    folder = RunFolder(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"no stage-2 checkpoint.*h2t train --out"):
        export_finished_folder(folder.root, config, digits, tmp_path / "m.onnx")
    train_two_stage(digits, config, folder, torch.device("cpu"))
    assert export_finished_folder(folder.root, config, digits, tmp_path / "m.onnx").export.path.exists()
    torch.save(load_checkpoint(folder.checkpoint(2)) | {"epoch": 0}, folder.checkpoint(2))
    with pytest.raises(ValueError, match=r"stage 2 .* stopped at epoch 0 of 1.*h2t train --out"):
        export_finished_folder(folder.root, config, digits, tmp_path / "n.onnx")


def test_calibration_of_the_served_artifact_matches_the_torch_model(digits, trained, tmp_path):
    served = export_and_calibrate(trained.model, digits, trained.groups, tmp_path / "m.onnx")
    torch_report = evaluate_predictions(
        torch.softmax(
            trained.model.eval()(
                (digits.test.images.float() / 255 - torch.tensor(digits.mean).view(1, 3, 1, 1))
                / torch.tensor(digits.std).view(1, 3, 1, 1)
            ),
            1,
        )
        .detach()
        .numpy(),
        digits.test.labels.numpy(),
        trained.groups,
    )
    assert served.calibration.top1 == pytest.approx(torch_report.top1, abs=1 / 300)
    again = evaluate_onnx(
        load_session(served.export.path), digits.test.images.numpy(), digits.test.labels.numpy(), trained.groups
    )
    assert again == served.calibration


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_decode_image_resizes_to_the_model_size_and_scales_to_unit_range():
    image = decode_image(_png(np.full((40, 30, 3), 255, dtype=np.uint8)), 16, 10_000)
    assert image.shape == (3, 16, 16) and image.dtype == np.float32 and np.allclose(image, 1.0)
    gray = decode_image(_png(np.zeros((16, 16), dtype=np.uint8)), 16, 10_000)
    assert gray.shape == (3, 16, 16)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"not an image", "not a readable image"),
        (_png(np.zeros((16, 16, 3), dtype=np.uint8))[:40], "not a readable image"),
        (_png(np.zeros((200, 200, 3), dtype=np.uint8)), "pixel limit"),
    ],
)
def test_decode_image_rejects_garbage_truncated_and_oversized_images(data, message):
    with pytest.raises(ValueError, match=message) as refused:
        decode_image(data, 16, 100 * 100)
    assert "BytesIO" not in str(refused.value) and not re.search(r"0x[0-9a-f]{6}", str(refused.value))


def test_batcher_combines_concurrent_requests_and_answers_each_exactly(digits, trained, tmp_path):
    from service.api.models_api.runtime import Batcher

    result = export_onnx(
        trained.model, _spec(digits, trained.groups), tmp_path / "m.onnx", digits.test.images.numpy()[:4]
    )
    session = load_session(result.path)
    requests = [
        digits.test.images.numpy()[i : i + k].astype(np.float32) / 255
        for i, k in ((0, 1), (5, 3), (20, 2), (40, 1), (60, 4))
    ]
    sizes = []

    async def scenario():
        batcher = Batcher(
            lambda x: run_probabilities(session, x), lambda data: decode_image(data, 16, 10**6), max_images=64,
            max_wait_s=0.05,
            on_batch=sizes.append
        )
        answers = await asyncio.gather(*(batcher.submit(r) for r in requests))
        await batcher.close()
        return answers

    answers = asyncio.run(scenario())
    assert max(sizes) > 1 and sum(sizes) == sum(len(r) for r in requests)
    for request, answer in zip(requests, answers, strict=True):
        assert np.array_equal(answer, run_probabilities(session, request))


def test_batcher_passes_an_inference_error_to_every_waiting_request():
    from service.api.models_api.runtime import Batcher

    def broken(x):
        raise RuntimeError("inference failed")

    async def scenario():
        batcher = Batcher(broken, lambda data: np.zeros((3, 2, 2), np.float32), max_images=8, max_wait_s=0.01)
        results = await asyncio.gather(
            *(batcher.submit(np.zeros((1, 3, 2, 2), np.float32)) for _ in range(3)), return_exceptions=True
        )
        await batcher.close()
        return results

    assert all(isinstance(r, RuntimeError) for r in asyncio.run(scenario()))
