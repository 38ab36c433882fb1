"""``fcnseg push`` and ``model.push_to_hub``, up to the Hub: no Hub is reachable from the tests, so
``huggingface_hub.HfApi``'s ``create_repo``, ``create_branch`` and ``upload_folder`` are replaced by recorders that
keep their arguments and the uploaded folder's files, which safetensors and huggingface_hub then read."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fcnseg
from fcnseg.cli import main
from tests.helpers import TINY, randomise

hf = pytest.importorskip("huggingface_hub")
safetensors_torch = pytest.importorskip("safetensors.torch")


@pytest.fixture
def uploads(monkeypatch):
    """Every call of the three HfApi methods, in order: (method, arguments); upload_folder's also records the
    files of the folder as they were when it was called, {name: bytes}."""
    calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return hf.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        calls.append(("upload_folder", {**kwargs, "files": {p.name: p.read_bytes() for p in folder.iterdir()}}))
        return SimpleNamespace(commit_url="unused")

    monkeypatch.setattr(hf.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(hf.HfApi, "create_branch", create_branch)
    monkeypatch.setattr(hf.HfApi, "upload_folder", upload_folder)
    return calls


@pytest.fixture
def checkpoint(tmp_path) -> tuple[Path, torch.nn.Module]:
    model = randomise(fcnseg.get_model("fcn8s", num_classes=3, **TINY), seed=0).eval()
    return fcnseg.save_checkpoint(model, tmp_path / "run" / "best.pt", classes=["a", "b", "c"]), model


def test_push_creates_the_repository_and_uploads_the_three_files(tmp_path, uploads, checkpoint, capsys):
    ckpt, _ = checkpoint
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    (evaluation / "metrics.json").write_text(json.dumps({"pixel_acc": 0.9, "mean_acc": 0.7, "mean_iu": 0.6,
                                                         "fw_iu": 0.8, "per_class": {}}))  # fmt: skip
    argv = ["push", str(ckpt), "--repo", "me/tiny-fcn", "--private", "--eval-dir", str(evaluation),
            "--dataset", "me/streets", "--license", "apache-2.0", "--tag", "roads"]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().out == f"pushed {ckpt} to https://huggingface.co/me/tiny-fcn\n"
    assert [name for name, _ in uploads] == ["create_repo", "upload_folder"]
    created, uploaded = uploads[0][1], uploads[1][1]
    assert created == {"repo_id": "me/tiny-fcn", "private": True, "exist_ok": True}
    assert uploaded["repo_id"] == "me/tiny-fcn" and uploaded["revision"] is None
    assert sorted(uploaded["files"]) == ["README.md", "config.json", "model.safetensors"]
    assert not Path(uploaded["folder_path"]).exists()  # a temporary folder, removed after the upload
    # The weights as safetensors reads them are the checkpoint's, as torch reads it.
    tensors = safetensors_torch.load(uploaded["files"]["model.safetensors"])
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    assert tensors.keys() == saved.keys() and all(torch.equal(tensors[k], v) for k, v in saved.items())
    assert json.loads(uploaded["files"]["config.json"])["classes"] == ["a", "b", "c"]
    card = hf.ModelCard(uploaded["files"]["README.md"].decode())
    assert (card.data.license, card.data.datasets, card.data.library_name) == ("apache-2.0", ["me/streets"], "fcnseg")
    assert "roads" in card.data.tags
    assert {r.metric_type: r.metric_value for r in card.data.eval_results}["mean_iou"] == 60.0
    assert "fcnseg predict --weights hf:me/tiny-fcn" in card.text


def test_push_to_a_branch(uploads, checkpoint, capsys):
    ckpt, _ = checkpoint
    assert main(["push", str(ckpt), "--repo", "me/tiny-fcn", "--revision", "v2"]) == 0
    assert capsys.readouterr().out.endswith("https://huggingface.co/me/tiny-fcn/tree/v2\n")
    assert [name for name, _ in uploads] == ["create_repo", "create_branch", "upload_folder"]
    assert uploads[0][1]["private"] is False
    assert uploads[1][1] == {"repo_id": "me/tiny-fcn", "branch": "v2", "exist_ok": True}
    assert uploads[2][1]["revision"] == "v2"


def test_the_model_method_uploads_the_same_files(uploads, checkpoint):
    _, model = checkpoint
    url = model.push_to_hub("me/api", private=True)
    assert url == "https://huggingface.co/me/api"
    assert uploads[0][1] == {"repo_id": "me/api", "private": True, "exist_ok": True}
    tensors = safetensors_torch.load(uploads[1][1]["files"]["model.safetensors"])
    assert all(torch.equal(tensors[k], v) for k, v in model.state_dict().items())


def test_out_writes_the_folder_and_uploads_nothing(tmp_path, uploads, checkpoint, capsys):
    ckpt, model = checkpoint
    out = tmp_path / "folder"
    assert main(["push", str(ckpt), "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote model.safetensors, config.json and README.md to {out}\n"
    assert uploads == []
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    x = torch.randn(1, 3, 24, 40)
    with torch.no_grad():
        assert torch.equal(fcnseg.from_pretrained(out)(x), model(x))
    capsys.readouterr()
    assert main(["push", str(out), "--out", str(out)]) == 2  # the folder read is never written over
    assert "is SOURCE itself" in capsys.readouterr().err


def _one_line_error(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fcnseg: error: ")
    return err.removeprefix("fcnseg: error: ").rstrip("\n")


def test_refusals_are_one_line_and_upload_nothing(tmp_path, uploads, checkpoint, capsys):
    ckpt, _ = checkpoint
    assert _one_line_error(["push", str(ckpt)], capsys) == (
        "push: expected --repo USER/NAME (upload) or --out DIR (write the folder only)"
    )
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    (evaluation / "metrics.json").write_text(json.dumps({"pixel_acc": 0.9, "mean_acc": 0.7, "mean_iu": 0.6,
                                                         "fw_iu": 0.8}))  # fmt: skip
    err = _one_line_error(["push", str(ckpt), "--repo", "me/x", "--eval-dir", str(evaluation)], capsys)
    assert err.startswith("metrics: name the dataset they were measured on")
    assert _one_line_error(["push", str(tmp_path / "none.pt"), "--repo", "me/x"], capsys) == (
        f"{tmp_path / 'none.pt'}: no such checkpoint file"
    )
    assert uploads == []


def test_the_hubs_refusal_is_one_line(monkeypatch, checkpoint, capsys):
    def refuse(self, repo_id, **kwargs):
        response = SimpleNamespace(headers={}, request=None)
        message = "401 Client Error: Unauthorized for url: .../api/repos/create"
        raise hf.errors.HfHubHTTPError(message, response=response)

    monkeypatch.setattr(hf.HfApi, "create_repo", refuse)
    ckpt, _ = checkpoint
    assert _one_line_error(["push", str(ckpt), "--repo", "me/x"], capsys) == (
        "me/x: the Hub refused: 401 Client Error: Unauthorized for url: .../api/repos/create"
    )

    def unreachable(self, repo_id, **kwargs):
        raise ConnectionError("[Errno 111] Connection refused")

    monkeypatch.setattr(hf.HfApi, "create_repo", unreachable)
    assert _one_line_error(["push", str(ckpt), "--repo", "me/x"], capsys) == (
        "me/x: the Hub cannot be reached (ConnectionError: [Errno 111] Connection refused)"
    )


def test_an_evaluation_names_its_dataset_and_split_on_the_card(tmp_path, uploads):
    # fcnseg eval records what it measured on in metrics.json, so --eval-dir alone is enough for the card.
    model = randomise(fcnseg.get_model("fcn8s", num_classes=7, **TINY), seed=1).eval()
    ckpt = fcnseg.save_checkpoint(model, tmp_path / "seven.pt")
    evaluation = tmp_path / "eval"
    assert main(["eval", str(ckpt), "--dataset", "synthetic", "--data-option", "size=32",
                 "--data-option", "num_images=2", "--split", "val", "--out", str(evaluation), "--num-workers", "0",
                 "--runtime", "eager", "--quiet", "--report-images", "0"]) == 0  # fmt: skip
    doc = json.loads((evaluation / "metrics.json").read_text())
    assert (doc["dataset"], doc["split"]) == ("synthetic", "val")
    assert main(["push", str(ckpt), "--out", str(tmp_path / "folder"), "--eval-dir", str(evaluation)]) == 0
    card = hf.ModelCard.load(tmp_path / "folder" / "README.md")
    assert card.data.datasets == ["synthetic"]
    (result,) = [r for r in card.data.eval_results if r.metric_type == "mean_iou"]
    assert (result.dataset_type, result.dataset_split) == ("synthetic", "val")
    assert result.metric_value == pytest.approx(100 * doc["mean_iu"], abs=0.01)
    assert "split val" in card.text and not uploads
