"""Built ONNX and OpenVINO files kept between processes (fcnseg.runtime.engines): reused for the same model, built
afresh when anything they are made from changes, named by their calibration images, pruned to a budget."""

import fcntl
import fnmatch
import importlib.util
import json
import os
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import fcnseg
import fcnseg.runtime.engines as engines
import fcnseg.runtime.onnx as onnx_mod
from fcnseg.cli import main
from fcnseg.runtime import make_runner
from fcnseg.runtime.choice import measure
from fcnseg.runtime.engines import build_folder, calibration_tag, code_fingerprint, engine_key, prune_engines
from fcnseg.runtime.openvino import openvino_available
from tests.helpers import TINY, randomise


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The engine cache on (the suite turns it off), in a folder of this test's own: its ``engines`` folder."""
    monkeypatch.setenv("FCNSEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FCNSEG_ENGINE_CACHE", "1")
    return tmp_path / "cache" / "engines"


def _model(seed=1, classes=3):
    return randomise(fcnseg.get_model("fcn8s", num_classes=classes, **TINY), seed=seed).eval()


def _counted(monkeypatch, owner, name) -> list:
    """Calls of ``owner.name`` from now on, one entry each; the function still runs."""
    calls, real = [], getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_the_same_weights_reuse_the_export_in_a_later_build(cache, monkeypatch):
    exports = _counted(monkeypatch, onnx_mod, "write_onnx")
    x = torch.randn(1, 3, 45, 61, generator=torch.Generator().manual_seed(0))
    first = make_runner(_model(), "onnx")(x)
    again = _model()  # a new object with the same weights, as a later process loads it
    second = make_runner(again, "onnx")(x)
    monkeypatch.setenv("FCNSEG_AUTO_PATHS", "eager,onnx")
    _, measured = measure(again, "auto", x)  # auto's candidates are built in the same folder
    assert len(exports) == 1
    (folder,) = cache.iterdir()
    assert folder.name == engine_key(again) and (folder / "model.onnx").is_file()
    with torch.no_grad():
        expected = again(x)
    assert torch.equal(first, second) and torch.equal(second, measured(x))
    assert torch.allclose(second, expected, atol=1e-4 * float(expected.max() - expected.min()))


def test_any_change_to_what_the_files_are_made_from_changes_the_folder(monkeypatch):
    model = _model()
    key = engine_key(model)
    assert engine_key(_model()) == key  # same architecture and weights
    # One value of the largest tensor, at an index a sampled fingerprint (one value in thousands) would skip.
    changed = _model()
    name, largest = max(changed.state_dict().items(), key=lambda kv: kv[1].numel())
    assert largest.numel() > 8192, name
    with torch.no_grad():
        largest.view(-1)[1] += 1e-3
    others = [changed, _model(classes=4), _model().to(torch.bfloat16)]
    monkeypatch.setenv("FCNSEG_CPU_FEATURES", "avx2,fma,avx512_vnni")  # int8's recipe follows VNNI
    others.append(model)
    keys = [engine_key(m) for m in others]
    monkeypatch.delenv("FCNSEG_CPU_FEATURES")
    versions = engines.library_versions()
    monkeypatch.setattr(engines, "library_versions", lambda: {**versions, "onnxruntime": "0.0.1"})
    keys.append(engine_key(model))
    monkeypatch.setattr(engines, "code_fingerprint", lambda: "0" * 16)
    keys.append(engine_key(model))
    assert len({key, *keys}) == 1 + len(keys)


def test_the_code_fingerprint_covers_every_source_file(tmp_path):
    root = tmp_path / "pkg"
    (root / "runtime").mkdir(parents=True)
    (root / "a.py").write_text("A = 1\n")
    (root / "runtime" / "b.py").write_text("B = 2\n")
    (root / "notes.txt").write_text("not code")
    seen = [code_fingerprint(root)]
    (root / "notes.txt").write_text("still not code")
    assert code_fingerprint.__wrapped__(root) == seen[0]
    (root / "runtime" / "b.py").write_text("B = 3\n")
    seen.append(code_fingerprint.__wrapped__(root))
    (root / "runtime" / "b.py").rename(root / "runtime" / "c.py")
    seen.append(code_fingerprint.__wrapped__(root))
    assert len(set(seen)) == 3


def test_int8_files_and_their_agreement_are_kept_per_calibration_set(cache, monkeypatch):
    quantised = _counted(monkeypatch, onnx_mod, "quantize_onnx")
    measured = _counted(monkeypatch, onnx_mod, "agreement")
    monkeypatch.setattr(onnx_mod, "INT8_WARN_BELOW", 1.01)  # every build warns, with the share it measured or read
    a, b = ([torch.randn(1, 3, 40, 56, generator=torch.Generator().manual_seed(s))] for s in (0, 1))
    x = torch.randn(1, 3, 40, 56, generator=torch.Generator().manual_seed(2))
    said = []
    for calibration in (a, b, a):
        with pytest.warns(UserWarning, match="onnx-int8 agrees with fp32 on only") as caught:
            said.append((make_runner(_model(), "onnx-int8", calibration=calibration)(x), str(caught[0].message)))
    assert len(quantised) == len(measured) == 2  # the third build made nothing and measured nothing
    assert torch.equal(said[0][0], said[2][0]) and said[0][1] == said[2][1]
    (folder,) = cache.iterdir()
    names = sorted(p.name for p in folder.glob("model.int8.*.onnx"))
    assert names == sorted(f"model.int8.{calibration_tag(c)}.onnx" for c in (a, b))
    assert calibration_tag(a) != calibration_tag([a[0] + 1e-6])
    # The file a later build reads: the share the check measured (here recomputed with the fp32 export).
    fp32 = onnx_mod.ort_session(folder / "model.onnx")
    int8 = folder / f"model.int8.{calibration_tag(a)}.onnx"
    kept = json.loads(onnx_mod.agreement_file(int8).read_text())["agreement"]
    assert kept == onnx_mod.agreement(onnx_mod.ort_session(int8), fp32, a, _model())
    onnx_mod.agreement_file(int8).write_text('{"agreement": 7}')  # not a share: measured again
    with pytest.warns(UserWarning, match=f"{100 * kept:.2f}%"):
        make_runner(_model(), "onnx-int8", calibration=a)
    assert len(measured) == 4  # the test's own call, then the rebuild's


@pytest.mark.skipif(not openvino_available(), reason="OpenVINO is not installed")
def test_openvino_int8_reuses_nncf_s_quantised_model(cache, monkeypatch):
    import nncf

    import fcnseg.runtime.openvino as ov_mod

    quantised = _counted(monkeypatch, nncf, "quantize")
    measured = _counted(monkeypatch, onnx_mod, "agreement")
    calibration = [torch.randn(1, 3, 40, 56, generator=torch.Generator().manual_seed(0))]
    x = torch.randn(2, 3, 33, 47, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        first = make_runner(_model(), "openvino-int8", calibration=calibration)(x)
        again = make_runner(_model(), "openvino-int8", calibration=calibration)(x)
        assert len(quantised) == len(measured) == 1 and torch.equal(first, again)
        # Its float layers in the other precision (oneDNN held below the CPU's bf16 instructions, or not): the
        # same int8 file, its agreement measured again.
        other = "f32" if ov_mod.int8_float_precision() == "bf16" else "bf16"
        monkeypatch.setattr(ov_mod, "int8_float_precision", lambda: other)
        compile_f32 = ov_mod.openvino_session  # compiled in f32 all the same: a CPU without bf16 may refuse bf16
        monkeypatch.setattr(ov_mod, "openvino_session", lambda source, precision="f32": compile_f32(source, "f32"))
        make_runner(_model(), "openvino-int8", calibration=calibration)
    assert len(quantised) == 1 and len(measured) == 2
    (folder,) = cache.iterdir()
    assert len(list(folder.glob("model.int8.cal-*.xml"))) == 1
    assert len(list(folder.glob("model.int8.cal-*.xml.*.agreement.json"))) == 2


@pytest.mark.skipif(not openvino_available(), reason="OpenVINO is an optional extra")
def test_every_kept_file_reaches_the_disk_before_its_name(cache, monkeypatch):
    """Renamed into place before its data is on the disk, a file can be left empty or cut short by a power cut, and
    a later process would reuse it: every file of the folder is synced once written whole, then renamed."""
    events, sync, rename = [], os.fsync, os.replace

    def synced(fd):  # the file synced, and how much of it was written by then
        events.append(("sync", os.path.realpath(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size))
        return sync(fd)

    def renamed(src, dst):
        events.append(("rename", os.path.realpath(src), os.path.realpath(dst)))
        return rename(src, dst)

    monkeypatch.setattr(os, "fsync", synced)
    monkeypatch.setattr(os, "replace", renamed)
    calibration = [torch.randn(1, 3, 40, 56, generator=torch.Generator().manual_seed(0))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for path in ("onnx-int8", "openvino-int8"):
            make_runner(_model(), path, calibration=calibration)
    tag = calibration_tag(calibration)
    (folder,) = cache.iterdir()
    kept = {os.path.realpath(f) for f in folder.iterdir() if f.name != ".lock"}
    renamed_to = {e[2]: (i, e[1]) for i, e in enumerate(events) if e[0] == "rename" and e[2] in kept}
    assert set(renamed_to) == kept
    # The export, both int8 files, NNCF's .bin, both agreements (and the rescaled graph: the suite's CPU features
    # have no VNNI).
    names = {os.path.basename(k) for k in kept}
    wanted = ["model.onnx", "model.int8.T.onnx", "model.int8.T.xml", "model.int8.T.bin",
              "model.int8.T.onnx.agreement.json", "model.int8.T.xml.*.agreement.json"]  # fmt: skip
    assert all(fnmatch.filter(names, w.replace(".T.", f".{tag}.")) for w in wanted), names
    for dst, (i, src) in renamed_to.items():
        sizes = [e[2] for e in events[:i] if e[0] == "sync" and e[1] == src]
        assert sizes and sizes[-1] == os.path.getsize(dst) > 0, dst
    xml = str(folder / f"model.int8.{tag}.xml")
    assert renamed_to[os.path.realpath(xml)][0] > renamed_to[os.path.realpath(xml[:-4] + ".bin")][0]  # pair


def test_predict_twice_exports_once_and_writes_the_same_masks(cache, monkeypatch, tmp_path):
    exports = _counted(monkeypatch, onnx_mod, "write_onnx")
    ckpt = fcnseg.save_checkpoint(_model(), tmp_path / "m.pt")
    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (37, 52, 3), dtype=np.uint8)).save(image)
    masks = []
    for run in ("one", "two"):
        args = ["predict", str(ckpt), str(image), "--out", str(tmp_path / run), "--runtime", "onnx", "--quiet"]
        assert main(args) == 0
        masks.append((tmp_path / run / "in.png").read_bytes())
    assert len(exports) == 1 and masks[0] == masks[1]


def test_off_or_unwritable_the_build_uses_a_temporary_folder(tmp_path, monkeypatch):
    x = torch.randn(1, 3, 30, 40)
    monkeypatch.setenv("FCNSEG_CACHE_DIR", str(tmp_path / "off"))
    monkeypatch.setenv("FCNSEG_ENGINE_CACHE", "0")
    make_runner(_model(), "onnx")(x)
    assert not (tmp_path / "off").exists()
    (tmp_path / "file").write_text("a file where the cache folder should be")
    monkeypatch.setenv("FCNSEG_CACHE_DIR", str(tmp_path / "file"))
    monkeypatch.setenv("FCNSEG_ENGINE_CACHE", "1")
    assert make_runner(_model(), "onnx")(x).shape == (1, 3, 30, 40)


def test_pruning_removes_the_least_recently_used_beyond_the_budget(tmp_path):
    now = 1e9
    hours = {"a": 10, "b": 5, "c": 2, "d": 0.5, "e": 0}  # hours since each folder was last used
    root = tmp_path / "engines"
    for name, age in hours.items():
        (root / name).mkdir(parents=True)
        (root / name / "model.onnx").write_bytes(b"x" * 100)
        os.utime(root / name, (now - 3600 * age, now - 3600 * age))

    def left():
        return sorted(p.name for p in root.iterdir())

    # e and d fit in 250 bytes; c does not, nor anything older.
    assert sorted(p.name for p in prune_engines(root, keep=root / "e", budget=250, now=now)) == ["a", "b", "c"]
    assert left() == ["d", "e"]
    # Over the budget but used within the hour (d), or the folder being built (e): kept.
    assert prune_engines(root, keep=root / "e", budget=0, now=now) == [] and left() == ["d", "e"]
    assert prune_engines(root, keep=root / "e", budget=0, now=now + 7200) == [root / "d"] and left() == ["e"]


def test_a_folder_held_by_a_build_is_not_removed(tmp_path):
    root = tmp_path / "engines"
    (root / "old").mkdir(parents=True)
    (root / "old" / "model.onnx").write_bytes(b"x" * 100)
    with open(root / "old" / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a build of that model, under way in another process
        os.utime(root / "old", (1.0, 1.0))
        assert prune_engines(root, keep=root / "new", budget=0) == [] and (root / "old").is_dir()
    assert prune_engines(root, keep=root / "new", budget=0) == [root / "old"] and not (root / "old").exists()


def test_two_builds_of_one_model_at_once_export_it_once(cache, monkeypatch):
    calls, real = [], onnx_mod.write_onnx

    def slow_export(*args, **kwargs):
        calls.append(args)
        time.sleep(0.5)  # long enough for the other build to reach the folder
        return real(*args, **kwargs)

    monkeypatch.setattr(onnx_mod, "write_onnx", slow_export)
    x = torch.randn(1, 3, 30, 40, generator=torch.Generator().manual_seed(0))
    models, outputs = [_model(), _model()], {}  # made first: randomise draws from torch's one generator

    def build(i):
        outputs[i] = make_runner(models[i], "onnx")(x)

    threads = [threading.Thread(target=build, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and torch.equal(outputs[0], outputs[1])


def test_a_build_clears_what_killed_builds_left_and_keeps_four_calibration_sets(cache):
    model = _model()
    folder = cache / engine_key(model)
    (folder / "tmpabc").mkdir(parents=True)  # NNCF's pair, staged by a process killed before the rename
    (folder / "tmpabc" / "model.int8.cal-000000000000.bin").write_bytes(b"half")
    (folder / ".model.onnx.x1y2.tmp").write_bytes(b"half an export")
    (folder / "model.onnx").write_bytes(b"kept")
    for i in range(6):  # six sets, the first used longest ago
        for name in (f"model.int8.cal-{i:012d}.onnx", f"model.int8.cal-{i:012d}.onnx.agreement.json"):
            (folder / name).write_bytes(b"x")
            os.utime(folder / name, (1e9 + i, 1e9 + i))
    with build_folder(model, None, "unused-") as held:
        assert held == folder
    left = sorted(p.name for p in folder.iterdir())
    kept = [f"model.int8.cal-{i:012d}.onnx{end}" for i in (2, 3, 4, 5) for end in ("", ".agreement.json")]
    assert left == sorted([".lock", "model.onnx", *kept])


def test_an_empty_file_left_by_a_power_cut_is_built_again(cache, monkeypatch):
    exports = _counted(monkeypatch, onnx_mod, "write_onnx")
    model = _model()
    (cache / engine_key(model)).mkdir(parents=True)
    (cache / engine_key(model) / "model.onnx").write_bytes(b"")  # renamed into place, its data never written
    x = torch.randn(1, 3, 30, 40)
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(make_runner(model, "onnx")(x), expected, atol=1e-4 * float(expected.max() - expected.min()))
    assert len(exports) == 1 and (cache / engine_key(model) / "model.onnx").stat().st_size > 0


def test_a_model_of_the_user_s_own_code_is_keyed_by_that_code(tmp_path, cache, monkeypatch):
    def load(text):  # a module of the user's, its head's forward adding a constant
        (tmp_path / "mine.py").write_text(text)
        spec = importlib.util.spec_from_file_location("mine", tmp_path / "mine.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, "mine", module)  # imported, as the user's code is
        spec.loader.exec_module(module)
        return module

    code = "import torch\nclass Shift(torch.nn.Module):\n    def forward(self, x):\n        return x + {}\n"
    keys = []
    for shift in (0, 1):
        model = _model()
        model.shift = load(code.format(shift)).Shift()
        keys.append(engine_key(model))
    assert None not in keys and keys[0] != keys[1]
    # A class with no source file to read (defined in a notebook, say): built in a temporary folder.
    notebook = type("Cell", (torch.nn.Module,), {"__module__": "notebook_cell", "forward": lambda self, x: x})
    model = _model()
    model.cell = notebook()
    assert engine_key(model) is None
    make_runner(model, "onnx")
    assert not cache.exists() or list(cache.iterdir()) == []
