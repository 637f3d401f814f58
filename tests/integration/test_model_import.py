"""A model trained by `h2t train` (no service) is imported with `h2t models import`: exported and calibrated
as a worker does for a service run, uploaded, registered under a name, and served by name; unfinished folders
and files that are no h2t model are refused."""

from __future__ import annotations

import json
import shutil

import httpx
import numpy as np
import pytest
from PIL import Image

from h2t.cli import main
from models.contract.onnx_model import load_session, read_rgb, run_probabilities, uint8_to_input
from tests.helpers import TINY_DATASET, tiny_run_config
from tests.integration.conftest import API_KEY, api_server
from tests.integration.test_client_cli import _h2t

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> object:
    """A folder `h2t train` finished on the embedded digits."""
    import yaml

    folder = tmp_path_factory.mktemp("local")
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump({"dataset": TINY_DATASET, **tiny_run_config()}))
    assert main(["train", "--config", str(config), "--out", str(folder / "out"), "--device", "cpu"]) == 0
    return folder / "out"


def test_a_locally_trained_model_is_imported_registered_and_served_by_name(settings, tmp_path, trained):
    with api_server(settings, tmp_path / "api.log") as base_url:
        imported = _h2t(base_url, "models", "import", str(trained), "--register", "digits-local", "--json")
        assert imported.returncode == 0, imported.stderr
        model = json.loads(imported.stdout)
        assert model["registered"] == {"name": "digits-local", "version": 1}
        assert model["run_id"] is None and model["origin"]["kind"] == "h2t train"
        assert model["origin"]["config"]["stage2"]["epochs"] == 2

        # its calibration is the exported file's, measured as for a service run: equal to the summary's report
        # of the same test split within what fp32 ONNX against the trainer's own evaluation can differ by
        summary = json.loads((trained / "summary.json").read_text())
        assert model["calibration"]["overall"]["accuracy"] == pytest.approx(summary["report"]["top1"], abs=0.02)
        assert model["calibration"]["overall"]["n"] == summary["test_images"]

        shown = json.loads(_h2t(base_url, "models", "show", "digits-local@1", "--json").stdout)
        assert shown["id"] == model["id"]
        onnx = tmp_path / "m.onnx"
        assert _h2t(base_url, "models", "download", "digits-local", "-o", str(onnx)).returncode == 0
        image = tmp_path / "digit.png"
        Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(image)
        answer = json.loads(_h2t(base_url, "predict", "digits-local", str(image), "--top-k", "10", "--json").stdout)
        direct = run_probabilities(load_session(onnx), uint8_to_input(read_rgb(image, 16)[None]))[0]
        served = {c["class_index"]: c["probability"] for c in answer["predictions"][0]["top_k"]}
        np.testing.assert_allclose([served[i] for i in range(10)], direct, atol=1e-6)
        plain = _h2t(base_url, "predict", "digits-local", str(image))
        assert plain.returncode == 0 and "digit.png:" in plain.stdout

        listed = json.loads(_h2t(base_url, "registry", "show", "digits-local", "--json").stdout)
        assert [v["model_id"] for v in listed["versions"]] == [model["id"]]
        again = json.loads(_h2t(base_url, "models", "import", str(trained), "--register", "digits-local",
                                "--json").stdout)
        assert again["registered"]["version"] == 2  # an existing name gets the next version
        assert _h2t(base_url, "registry", "alias", "digits-local", "production", "1").returncode == 0
        assert json.loads(_h2t(base_url, "models", "show", "digits-local@production", "--json").stdout)["id"] == \
            model["id"]


def test_an_unfinished_folder_and_a_foreign_file_are_refused(settings, tmp_path, trained):
    with api_server(settings, tmp_path / "api.log") as base_url:
        unfinished = tmp_path / "unfinished"
        unfinished.mkdir()
        shutil.copy(trained / "config.yaml", unfinished / "config.yaml")
        refused = _h2t(base_url, "models", "import", str(unfinished))
        assert refused.returncode == 2 and "no stage-2 checkpoint" in refused.stderr

        manifest = json.dumps({"calibration": {"top1": 0.5, "groups": {}}, "parity": {"max_abs_diff": 0,
                                                                                        "images": 1}})
        with httpx.Client(base_url=base_url, headers={"X-API-Key": API_KEY}) as http:
            garbage = http.post("/v1/models", files={"onnx": ("m.onnx", b"not a model")}, data={"manifest": manifest})
            assert garbage.status_code == 422 and "not an ONNX model" in garbage.json()["detail"]
            no_manifest = http.post("/v1/models", files={"onnx": ("m.onnx", b"x")})
            assert no_manifest.status_code == 422
            assert http.get("/v1/models").json()["count"] == 0
            assert not list((settings.artifact_dir / "models").glob("*"))  # nothing kept of a refused file
