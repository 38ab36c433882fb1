"""Hugging Face Hub folders (``save_pretrained`` / ``from_pretrained`` / ``hf:USER/NAME``), checked by the Hub's own
libraries: safetensors reads the weights, huggingface_hub parses the model card and fills its cache.

No Hub is reachable from the tests. A repository is served by a local HTTP server that answers the two requests
``huggingface_hub.hf_hub_download`` makes (HEAD and GET of ``/USER/NAME/resolve/REVISION/FILE``, with the
``X-Repo-Commit`` and ``ETag`` headers the Hub sends), so that the library itself writes its cache; the loads that
matter then run with ``HF_HUB_OFFLINE=1`` from that cache, as a machine without network would.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fcnseg
from fcnseg.cli import main
from fcnseg.errors import FcnsegError
from fcnseg.preprocessing import CAFFE
from tests.helpers import TINY, code_pickle, randomise

hf = pytest.importorskip("huggingface_hub")
safetensors_torch = pytest.importorskip("safetensors.torch")


def tiny_model() -> torch.nn.Module:
    """A random tiny FCN-8s whose classes, colours and input are all other than the defaults."""
    model = randomise(fcnseg.get_model("fcn8s", num_classes=3, **TINY), seed=0).eval()
    model.classes = ["sky", "road", "car"]
    model.palette = [[1, 2, 3], [40, 50, 60], [200, 100, 0]]
    model.preprocessing = CAFFE
    return model


def two_headed() -> torch.nn.Module:
    model = randomise(fcnseg.get_model("fcn16s_twohead", num_classes=4, second_classes=3, **TINY), seed=1).eval()
    model.classes = ["a", "b", "c", "d"]
    model.head_classes = {"semantic": ["a", "b", "c", "d"], "geometric": ["sky", "horizontal", "vertical"]}
    return model


def logits(model: torch.nn.Module, seed: int = 2) -> torch.Tensor:
    x = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x)


def as_json(value):
    return json.loads(json.dumps(value))


# ------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("build", [tiny_model, two_headed], ids=["fcn8s", "two-headed"])
def test_a_saved_folder_loads_back_as_the_same_model(tmp_path, build):
    model = build()
    folder = model.save_pretrained(tmp_path / "repo")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = fcnseg.from_pretrained(folder)
    assert not loaded.training
    assert torch.equal(logits(loaded), logits(model))  # the original model's eager logits
    assert (loaded.classes, loaded.head_classes, loaded.palette) == (model.classes, model.head_classes,
                                                                     model.palette or loaded.palette)  # fmt: skip
    assert loaded.preprocessing == model.preprocessing and loaded.heads == model.heads
    assert loaded.build_config["name"] == model.build_config["name"]
    assert as_json(loaded.build_config["kwargs"]) == as_json(model.build_config["kwargs"])
    # fcnseg.load takes the folder too, as every command does.
    assert torch.equal(logits(fcnseg.load(folder)), logits(model))


def test_the_weights_file_is_the_state_dict_and_the_config_says_what_the_model_is(tmp_path):
    model = tiny_model()
    folder = model.save_pretrained(tmp_path)
    tensors = safetensors_torch.load_file(folder / "model.safetensors")
    state = model.state_dict()
    assert list(tensors) == sorted(state) or set(tensors) == set(state)
    for key, value in state.items():
        assert tensors[key].dtype == value.dtype and torch.equal(tensors[key], value), key
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    config = json.loads((folder / "config.json").read_text())
    assert config["format"] == "fcnseg" and config["schema_version"] == 1
    assert config["fcnseg_version"] == fcnseg.__version__
    assert config["architecture"] == "fcn8s" and config["options"]["width"] == 1 / 16
    assert config["num_classes"] == 3 and config["in_channels"] == 3 and config["alignment"] == "aligned"
    assert config["classes"] == ["sky", "road", "car"] and config["palette"] == [[1, 2, 3], [40, 50, 60], [200, 100, 0]]
    assert config["preprocessing"] == {
        "mean": [104.00699, 116.66877, 122.67892], "std": [1.0, 1.0, 1.0], "channel_order": "BGR", "value_range": 255.0
    }  # fmt: skip
    assert not list(folder.glob(".*.tmp"))  # each file was written under a temporary name and renamed


def test_tied_and_expanded_tensors_are_saved_as_copies(tmp_path):
    # safetensors refuses tensors sharing memory and stores no strides: a tied kernel and an expanded (stride 0)
    # zero bias must still be written and read back with their values.
    model = tiny_model()
    up = model.score_heads.out.upsample_skip
    up.pool3.weight = up.pool4.weight
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.bias is not None)
    conv.bias = torch.nn.Parameter(torch.zeros(1).expand(conv.out_channels))
    state = model.state_dict()
    assert (
        state["score_heads.out.upsample_skip.pool3.weight"].data_ptr()
        == state["score_heads.out.upsample_skip.pool4.weight"].data_ptr()
    )
    folder = model.save_pretrained(tmp_path)
    tensors = safetensors_torch.load_file(folder / "model.safetensors")
    assert all(torch.equal(tensors[k], v) for k, v in state.items())
    assert torch.equal(logits(fcnseg.from_pretrained(folder)), logits(model))


def test_a_checkpoint_file_is_saved_as_a_folder(tmp_path):
    model = two_headed()
    ckpt = fcnseg.save_checkpoint(model, tmp_path / "best.pt")
    from fcnseg.pretrained import save_pretrained

    folder = save_pretrained(ckpt, tmp_path / "repo")
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    tensors = safetensors_torch.load_file(folder / "model.safetensors")
    assert tensors.keys() == saved.keys() and all(torch.equal(tensors[k], v) for k, v in saved.items())
    assert torch.equal(logits(fcnseg.from_pretrained(folder)), logits(model))


# ------------------------------------------------------------------------------------------ the model card


def write_metrics(folder: Path, values: dict) -> Path:
    """A metrics.json as ``fcnseg eval --out`` writes it (fcnseg.engine.evaluate.metrics_dict's keys)."""
    folder.mkdir(parents=True, exist_ok=True)
    doc = {**values, "per_class": {"a": {"iu": 0.5, "acc": 0.5, "pixels": 10}}}
    (folder / "metrics.json").write_text(json.dumps(doc))
    return folder


def test_the_card_is_read_by_huggingface_hub_with_metadata_and_results(tmp_path):
    from huggingface_hub import ModelCard, ModelCardData, metadata_load
    from huggingface_hub.repocard_data import model_index_to_eval_results

    evaluation = write_metrics(tmp_path / "eval", {"pixel_acc": 0.91234, "mean_acc": 0.5, "mean_iu": 0.62346,
                                                   "fw_iu": None})  # fmt: skip
    from fcnseg.engine.evaluate import metrics_dict
    from fcnseg.metrics import ConfusionMatrix

    assert set(metrics_dict(ConfusionMatrix(2), ["a", "b"])) >= {"pixel_acc", "mean_acc", "mean_iu", "fw_iu"}
    folder = tiny_model().save_pretrained(
        tmp_path / "repo", metrics=evaluation, license="mit", datasets=["user/streets"], tags=["roads"],
        repo_id="user/tiny", eval_split="val",
    )  # fmt: skip
    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert (data.library_name, data.pipeline_tag, data.license) == ("fcnseg", "image-segmentation", "mit")
    assert data.datasets == ["user/streets"]
    assert set(data.tags) == {"fcnseg", "semantic-segmentation", "fcn", "fcn8s", "roads"}
    # ModelCard.validate asks the Hub's server; offline, the model-index is checked by the library's own parser and
    # ModelCardData's validation of the results it gives.
    name, results = model_index_to_eval_results(metadata_load(folder / "README.md")["model-index"])
    ModelCardData(model_name=name, eval_results=results)
    got = {r.metric_type: r.metric_value for r in results}
    assert got == {"pixel_accuracy": 91.23, "mean_accuracy": 50.0, "mean_iou": 62.35}  # fw_iu unknown: left out
    assert {(r.task_type, r.dataset_type, r.dataset_split) for r in results} == {
        ("image-segmentation", "user/streets", "val")
    }
    assert "| out | 91.23 | 50.00 | 62.35 | - |" in card.text
    assert 'fcnseg.from_pretrained("user/tiny")' in card.text
    assert "fcnseg predict --weights hf:user/tiny img.jpg --out masks/" in card.text


def test_a_two_headed_evaluation_gives_results_per_head(tmp_path):
    from huggingface_hub import ModelCard

    evaluation = tmp_path / "eval"
    write_metrics(evaluation / "semantic", {"pixel_acc": 0.8, "mean_acc": 0.4, "mean_iu": 0.3, "fw_iu": 0.7})
    write_metrics(evaluation / "geometric", {"pixel_acc": 0.9, "mean_acc": 0.85, "mean_iu": 0.8, "fw_iu": 0.82})
    folder = two_headed().save_pretrained(tmp_path / "repo", metrics=evaluation, datasets="siftflow")
    results = ModelCard.load(folder / "README.md").data.eval_results
    iu = {r.metric_name: r.metric_value for r in results if r.metric_type == "mean_iou"}
    assert sorted(iu.values()) == [30.0, 80.0] and any("geometric" in k for k in iu if iu[k] == 80.0)


def test_metrics_without_a_dataset_are_refused(tmp_path):
    evaluation = write_metrics(tmp_path / "eval", {"pixel_acc": 0.9, "mean_acc": 0.5, "mean_iu": 0.6, "fw_iu": 0.7})
    with pytest.raises(FcnsegError, match="name the dataset"):
        tiny_model().save_pretrained(tmp_path / "repo", metrics=evaluation)
    (evaluation / "metrics.json").write_text('{"loss": 1}')
    with pytest.raises(FcnsegError, match="expected fcnseg eval's metrics.json"):
        tiny_model().save_pretrained(tmp_path / "repo", metrics=evaluation, datasets="voc")
    assert not (tmp_path / "repo").exists()  # nothing written before the card could be made


# ------------------------------------------------------------------------------------------ a Hub, served locally


class HubHandler(http.server.BaseHTTPRequestHandler):
    """``/USER/NAME/resolve/REVISION/FILE`` of the server's ``repos`` ({repo id: folder}); a 404 with the Hub's
    ``X-Error-Code`` for an unknown repository, revision or file."""

    def _answer(self, body: bool) -> None:
        self.server.requests.append(self.path)
        parts = self.path.lstrip("/").split("/", 4)
        repo = "/".join(parts[:2])
        if repo not in self.server.repos or len(parts) < 5 or parts[2] != "resolve":
            self._missing("RepoNotFound")
            return
        commit = hashlib.sha1(repo.encode()).hexdigest()
        file = self.server.repos[repo] / parts[4]
        if parts[3] not in ("main", commit) or not file.is_file():
            self._missing("RevisionNotFound" if parts[3] not in ("main", commit) else "EntryNotFound")
            return
        data = file.read_bytes()
        self.send_response(200)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _missing(self, code: str) -> None:
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self) -> None:  # noqa: N802  (http.server's names)
        self._answer(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(body=True)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def hub_server(tmp_path, monkeypatch):
    """A local Hub, huggingface_hub pointed at it and its cache in ``tmp_path / "hf-cache"``; ``.offline()``
    then sets HF_HUB_OFFLINE=1 (the server keeps running, so that a request would be seen in ``.requests``)."""
    from huggingface_hub import constants

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    server.repos, server.requests = {}, []
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    cache = tmp_path / "hf-cache"
    # huggingface_hub reads HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE when it is imported (Hub Python Library
    # docs, "Environment variables"), into its constants module: the variables are set, and those values too.
    settings = {"ENDPOINT": endpoint, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": False,
                "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}"}  # fmt: skip
    for name, value in settings.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def offline() -> None:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    server.cache, server.offline = cache, offline
    yield server
    server.shutdown()
    server.server_close()


def test_a_hub_repository_is_cached_by_huggingface_hub_and_read_offline(tmp_path, hub_server, capsys):
    model = tiny_model()
    hub_server.repos["user/tiny"] = model.save_pretrained(tmp_path / "published")
    first = fcnseg.from_pretrained("user/tiny")  # online: huggingface_hub downloads into its cache
    assert torch.equal(logits(first), logits(model))
    scan = hf.scan_cache_dir(hub_server.cache)
    assert not scan.warnings
    (repo,) = scan.repos
    (revision,) = repo.revisions
    assert (repo.repo_id, repo.repo_type, revision.refs) == ("user/tiny", "model", frozenset({"main"}))
    assert {f.file_name for f in revision.files} == {"config.json", "model.safetensors"}

    hub_server.offline()
    asked = len(hub_server.requests)
    assert torch.equal(logits(fcnseg.from_pretrained("user/tiny")), logits(model))
    assert torch.equal(logits(fcnseg.load("hf:user/tiny")), logits(model))
    assert torch.equal(logits(fcnseg.load(f"hf:user/tiny@{revision.commit_hash}")), logits(model))
    assert torch.equal(logits(fcnseg.from_pretrained("user/tiny", revision=revision.commit_hash)), logits(model))
    with pytest.raises(FcnsegError, match="not in the local cache|offline"):  # a revision never fetched
        fcnseg.from_pretrained("user/tiny", revision="v9")

    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "masks"
    assert main(["predict", "hf:user/tiny", str(image), "--out", str(out), "--runtime", "eager", "--quiet"]) == 0
    expected = fcnseg.Predictor(model, runtime="eager").masks([str(image)])[0]["out"]
    assert np.array_equal(np.asarray(Image.open(out / "img.png")), expected)
    out = tmp_path / "masks-weights"
    argv = ["predict", "--weights", "hf:user/tiny", str(image), "--out", str(out), "--runtime", "eager", "--quiet"]
    assert main(argv) == 0
    assert np.array_equal(np.asarray(Image.open(out / "img.png")), expected)
    assert len(hub_server.requests) == asked  # offline: every file came from the cache


def test_training_starts_from_a_hub_model(tmp_path, hub_server):
    from fcnseg.engine.fitting import staged_init

    source = tiny_model()
    hub_server.repos["user/tiny"] = source.save_pretrained(tmp_path / "published")
    target = fcnseg.get_model("fcn8s", num_classes=5, **TINY)
    left = staged_init(target, "hf:user/tiny")
    own = target.state_dict()
    shared = [k for k in source.state_dict() if k.startswith("backbone.")]
    assert shared and all(torch.equal(own[k], source.state_dict()[k]) for k in shared)
    assert all(k.startswith("score_heads.") for k in left)  # 5 classes: the scores keep their own start
    assert target.preprocessing == CAFFE


# ------------------------------------------------------------------------------------------ refusals


def predict_error(args: list[str], tmp_path: Path, capsys) -> str:
    """Run ``fcnseg predict`` with ``args``; it must fail with exit status 2 and one line on stderr: that line."""
    image = tmp_path / "img.png"
    Image.new("RGB", (40, 24)).save(image)
    capsys.readouterr()
    assert main(["predict", *args, str(image), "--out", str(tmp_path / "masks")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fcnseg: error: ")
    return err.removeprefix("fcnseg: error: ").rstrip("\n")


def test_an_unknown_repository_is_one_line_online_and_offline(tmp_path, hub_server, capsys):
    err = predict_error(["hf:nobody/none"], tmp_path, capsys)
    assert err.startswith("hf:nobody/none: no such repository on the Hugging Face Hub")
    hub_server.offline()
    err = predict_error(["hf:nobody/none"], tmp_path, capsys)
    assert err == (
        f"hf:nobody/none: config.json is not in the local Hugging Face cache ({hub_server.cache}) and the Hub is "
        "offline (HF_HUB_OFFLINE=1)"
    )


def test_a_missing_file_is_named_online_and_offline(tmp_path, hub_server, capsys):
    folder = tiny_model().save_pretrained(tmp_path / "published")
    (folder / "model.safetensors").unlink()
    hub_server.repos["user/half"] = folder
    err = predict_error(["hf:user/half"], tmp_path, capsys)
    assert err.startswith("hf:user/half: the repository has no model.safetensors (not an fcnseg model?")
    hub_server.offline()  # config.json was cached by the first try; the weights never were
    err = predict_error(["hf:user/half"], tmp_path, capsys)
    assert err.startswith("hf:user/half: model.safetensors is not in the local Hugging Face cache")
    err = predict_error(["hf:user/half@v2"], tmp_path, capsys)
    assert err.startswith("hf:user/half@v2: config.json is not in the local Hugging Face cache")


def test_a_config_from_a_newer_fcnseg_is_refused_before_the_weights_are_fetched(tmp_path, hub_server, capsys):
    folder = tiny_model().save_pretrained(tmp_path / "published")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "schema_version": 2, "fcnseg_version": "9.0"}))
    hub_server.repos["user/future"] = folder
    err = predict_error(["hf:user/future"], tmp_path, capsys)
    assert err == (
        "hf:user/future: config.json was written by a newer fcnseg (schema 2, '9.0'; this one reads 1); upgrade fcnseg"
    )
    assert not any(p.endswith("model.safetensors") for p in hub_server.requests)
    with pytest.raises(FcnsegError, match="written by a newer fcnseg"):
        fcnseg.from_pretrained(folder)


def test_a_foreign_config_and_weights_that_do_not_fit_are_refused(tmp_path, capsys):
    folder = tiny_model().save_pretrained(tmp_path / "repo")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({"model_type": "segformer", "num_labels": 3}))
    err = predict_error([str(folder)], tmp_path, capsys)
    assert (
        err == f'{folder}: config.json is not an fcnseg model\'s (no "format": "fcnseg"; a model of another library?)'
    )
    (folder / "config.json").write_text(json.dumps({**config, "architecture": "fcn32s"}))
    err = predict_error([str(folder)], tmp_path, capsys)
    assert err.startswith(f"{folder}: weights do not fit model 'fcn32s' (another architecture?)")


def test_a_pickle_in_place_of_the_weights_is_never_unpickled(tmp_path, capsys):
    folder = tiny_model().save_pretrained(tmp_path / "repo")
    marker = tmp_path / "ran"
    code_pickle(folder / "model.safetensors", marker)
    err = predict_error([str(folder)], tmp_path, capsys)
    assert err.startswith(f"{folder}: model.safetensors is not a readable safetensors file")
    assert not marker.exists()


def test_without_the_hub_extra_the_error_names_it(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # as if not installed: importing it fails
    with pytest.raises(FcnsegError) as caught:
        tiny_model().save_pretrained(tmp_path)
    assert str(caught.value) == "save_pretrained needs huggingface_hub and safetensors: pip install 'fcnseg[hub]'"
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(FcnsegError, match=r"^hf:user/tiny needs huggingface_hub and safetensors: pip install"):
        fcnseg.load("hf:user/tiny")
