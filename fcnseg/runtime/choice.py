"""``auto`` and ``auto-reduced`` chosen by measurement among the installed engines, and the choice cached.

Which path is fastest depends on the CPU (AVX2, AVX-512, VNNI, AVX512_BF16, AMX), the thread count, the engines'
versions, the model and the input's size: no rule written from features alone stays right across machines. So the
first time ``auto`` meets a CPU, model and size class, it builds every candidate path (:func:`candidates`), runs each
on the first input and times them in alternating rounds; ``auto`` takes the fastest fp32-class path (agreement with
eager fp32 >= 99.99% by construction: each is checked against the model's forward when it is built),
``auto-reduced`` the fastest of all that keeps :data:`REDUCED_MIN_AGREEMENT` of eager fp32's labels on the
calibration images. The choice is saved in ``runtime-choices.json`` in fcnseg's cache folder under
:func:`choice_key`, so later runs build only the chosen path.

int8 short of the bar may reach it with more layers kept in float (:func:`float_tries`): first the layer its float
first layer feeds (conv1_2), then, where ``fcnseg bench --int8-sensitivity`` has ranked this model's layers
(:func:`save_sensitivity`), the worst 1, 2, 4 of them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import FcnsegError, first_line
from ..io import cache_root
from .compare import Runner, agreement
from .cpu import NATIVE_BF16, VNNI, bf16_is_native, cpu_features, cpu_key
from .engines import build_folder
from .kernels import KERNELS, kernels_pay
from .onnx import INT8_RECIPE
from .openvino import openvino_available, openvino_version

REDUCED_MIN_AGREEMENT = 0.995  # auto-reduced: the share of eager fp32's labels a path must keep
ROUNDS = 3  # alternating timed rounds per candidate
DROP_SLOWER = 2.0  # after the first round, a candidate this many times slower than the fastest is not timed again
FLOAT_TRIES = (1, 2, 4)  # int8 retried with this many of its costliest layers in float
FP32_PATHS = ("eager", "winograd", "onnx", "openvino")
REDUCED_PATHS = ("bf16", "openvino-bf16", "onnx-int8", "openvino-int8")

Timer = Callable[[str, Runner, torch.Tensor], float]
# A candidate that fails to build is left out with the reason, whatever it raises: the engines have exception types
# of their own that derive from Exception alone (ONNX Runtime's Fail and InvalidArgument, NNCF's errors).
BUILD_ERRORS = (Exception,)


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def onnx_available() -> bool:
    """Whether the ONNX export and ONNX Runtime are installed (``pip install "fcnseg[onnx]"``)."""
    return all(_has(m) for m in ("onnx", "onnxscript", "onnxruntime"))


def candidates(reduced: bool, features: frozenset[str] | None = None) -> list[str]:
    """The paths ``auto`` (or, with ``reduced``, ``auto-reduced``) measures on this machine: the installed engines'
    paths this CPU runs at speed (winograd needs AVX2 and FMA, bf16 native bf16, int8 AVX2).
    ``FCNSEG_AUTO_PATHS`` (comma-separated) narrows them to those it names."""
    features = cpu_features() if features is None else features
    onnx, ov = onnx_available(), openvino_available()
    nncf = ov and _has("nncf")  # openvino-int8's quantiser
    usable = {
        "eager": True,
        "winograd": kernels_pay(features),
        "onnx": onnx,
        "openvino": ov and onnx,
        "bf16": bool(features & NATIVE_BF16) and bf16_is_native(),
        "openvino-bf16": ov and onnx and bool(features & NATIVE_BF16) and bf16_is_native(),
        "onnx-int8": onnx and "avx2" in features,
        "openvino-int8": nncf and onnx and "avx2" in features,
    }
    paths = [p for p in FP32_PATHS + (REDUCED_PATHS if reduced else ()) if usable[p]]
    allowed = os.environ.get("FCNSEG_AUTO_PATHS")
    if allowed:
        named = set(allowed.replace(",", " ").split())
        paths = [p for p in paths if p in named] or ["eager"]
    return paths


def engine_versions() -> str:
    """fcnseg's kernel set and int8 recipe, and the versions of the engines besides torch (whose version
    :func:`~fcnseg.runtime.cpu.cpu_key` holds) that a measurement is valid for."""
    versions = [f"fcnseg kernels {'+'.join(KERNELS)}", f"int8 {INT8_RECIPE}"]  # the winograd path's kernels, int8's
    if onnx_available():
        import onnxruntime

        versions.append(f"onnxruntime {onnxruntime.__version__}")
    if openvino_available():
        versions.append(f"openvino {openvino_version()}")
    return ", ".join(versions)


def weights_fingerprint(model: nn.Module) -> str:
    """A short hash of the weights: each tensor's name, shape and about 4,000 of its values, evenly spread. Cheap
    (it does not read every byte) and different for any two trainings."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy()
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(sample.tobytes())
    return h.hexdigest()[:16]


def model_key(model: nn.Module, reduced: bool) -> str:
    """The model as the choice depends on it: its architecture (build config, heads, input channels) and, for
    ``auto-reduced``, whose agreement depends on the weights, :func:`weights_fingerprint`."""
    doc = json.dumps([model.build_config, model.heads, model.in_channels], sort_keys=True, default=str)
    arch = hashlib.sha256(doc.encode()).hexdigest()[:16]
    name = (model.build_config or {}).get("name", "model")
    return f"{name} {arch}" + (f" weights {weights_fingerprint(model)}" if reduced else "")


def size_class(x: torch.Tensor) -> str:
    """The batch and the input's area rounded to a half power of two: photos of nearby sizes share a choice."""
    n, _, h, w = x.shape
    return f"{n}x~{2 ** (round(2 * math.log2(max(h * w, 1))) / 2):.0f}px"


def feature_key(features: frozenset[str] | None = None) -> str:
    """The CPU features the paths' recipes follow (:func:`~fcnseg.runtime.cpu.cpu_features`, which
    ``FCNSEG_CPU_FEATURES`` overrides, and a virtual machine may mask under the same model name): AVX2 and FMA
    (winograd, int8), VNNI (int8's weights: 8 bits, else 7 and rescaled channels) and native bf16."""
    features = cpu_features() if features is None else features
    named = {"avx2": {"avx2"}, "fma": {"fma"}, "vnni": VNNI, "bf16": NATIVE_BF16}
    return "features " + "+".join(name for name, flags in named.items() if features & flags)


def choice_key(model: nn.Module, auto: str, x: torch.Tensor, paths: Sequence[str] = ()) -> str:
    """What a measured choice is valid for: CPU model, instruction sets and thread count
    (:func:`~fcnseg.runtime.cpu.cpu_key`), the features the recipes follow (:func:`feature_key`), the engines'
    versions, ``auto`` or ``auto-reduced``, the candidates measured (``paths``: a path installed or allowed since is
    measured), the model (:func:`model_key`) and the size class (:func:`size_class`)."""
    parts = [cpu_key(), feature_key(), engine_versions(), auto, "candidates " + ",".join(sorted(paths))]
    return " | ".join([*parts, model_key(model, auto == "auto-reduced"), size_class(x)])


@dataclass
class Choice:
    """One measured choice: the path, each candidate's median milliseconds, the reduced paths' agreement with eager
    fp32, the candidates left out and why, the layers int8 keeps in float beyond the model's own."""

    auto: str
    path: str
    ms: dict[str, float]
    agreement: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    keep_float: list[str] = field(default_factory=list)
    size: str = ""
    cached: bool = False
    note: str = ""  # why nothing was measured

    def line(self) -> str:
        """What was chosen and the measured alternatives, in one line."""
        if not self.ms:
            return f"runtime {self.auto}: {self.path} ({self.note})"
        others = ", ".join(f"{p} {ms:.0f}" for p, ms in sorted(self.ms.items(), key=lambda kv: kv[1]) if p != self.path)
        agree = f", {100 * self.agreement[self.path]:.2f}% of fp32's labels" if self.path in self.agreement else ""
        floats = f", {len(self.keep_float)} more layer(s) in float" if self.keep_float else ""
        text = f"runtime {self.auto}: {self.path} ({self.ms.get(self.path, float('nan')):.0f} ms{agree}{floats}"
        text += f"; measured on {self.size}" + (" earlier, cached" if self.cached else "")
        text += f": {others} ms" if others else ""
        if self.rejected:
            text += "; not taken: " + ", ".join(f"{p} ({why})" for p, why in self.rejected.items())
        return text + ")"


def choices_path() -> Path:
    """``runtime-choices.json`` in fcnseg's cache folder."""
    return cache_root() / "runtime-choices.json"


def _read(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _save(path: Path, key: str, value: dict) -> bool:
    """``value`` under ``key``, merged with what other processes saved (the file is read, changed and written under
    an exclusive lock of its ``.lock`` file where the OS has ``flock``). False where the cache cannot be written."""
    from ..io import atomic_write, lock_exclusive

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "a") as lock:  # unlocked when closed
            if not lock_exclusive(lock):
                return False
            doc = _read(path)
            doc[key] = value
            with atomic_write(path, "w") as f:
                json.dump(doc, f, indent=1, sort_keys=True)
    except OSError:
        return False
    return True


_FIELD_TYPES = {"auto": str, "path": str, "size": str, "note": str}
_MAP_TYPES = {"ms": (int, float), "agreement": (int, float), "rejected": str}


def _well_formed(entry: object) -> bool:
    """Whether a saved entry has :class:`Choice`'s fields with their types (a file written by another fcnseg
    version, or edited by hand, is measured again rather than trusted)."""
    if not isinstance(entry, dict) or not {"auto", "path", "ms"} <= entry.keys() <= set(Choice.__dataclass_fields__):
        return False
    if any(not isinstance(entry.get(k, ""), t) for k, t in _FIELD_TYPES.items()):
        return False
    for name, types in _MAP_TYPES.items():
        value = entry.get(name, {})
        if not isinstance(value, dict) or not all(isinstance(v, types) for v in value.values()):
            return False
    floats = entry.get("keep_float", [])
    return isinstance(floats, list) and all(isinstance(f, str) for f in floats)


def cached_choice(key: str, auto: str, allowed: Sequence[str]) -> Choice | None:
    """The choice saved under ``key`` if it is well formed and its path still among ``allowed``."""
    entry = _read(choices_path()).get(key)
    if not _well_formed(entry):
        return None
    choice = Choice(**{**entry, "cached": True})
    return choice if choice.auto == auto and choice.path in allowed else None


def sensitivity_path() -> Path:
    """``int8-sensitivity.json`` in fcnseg's cache folder: per model weights, the layers by the agreement they cost."""
    return cache_root() / "int8-sensitivity.json"


def save_sensitivity(model: nn.Module, ranking: dict[str, float]) -> None:
    """Keep ``ranking`` (``{layer: agreement when only it is int8}``, costliest first) for ``auto-reduced``."""
    _save(sensitivity_path(), model_key(model, reduced=True), ranking)


def saved_sensitivity(model: nn.Module) -> list[str]:
    """The layers of ``model``'s weights by the agreement int8 costs them, costliest first (none if not ranked)."""
    ranking = _read(sensitivity_path()).get(model_key(model, reduced=True))
    if not isinstance(ranking, dict) or not all(isinstance(v, int | float) for v in ranking.values()):
        return []
    return sorted(ranking, key=ranking.__getitem__)


def time_once(path: str, run: Runner, x: torch.Tensor) -> float:
    """Milliseconds of one call of ``run`` on ``x``: the measurement's clock (a test may stand in its own)."""
    t0 = time.perf_counter()
    run(x)
    return (time.perf_counter() - t0) * 1000


def _build(model, path, x, calibration, folder, keep_float=(), *, warm: bool = True) -> Runner:
    """``path`` built and, with ``warm``, run once on ``x`` (the untimed first call of a measurement)."""
    from .paths import make_runner

    # eager as the model runs it, in its own memory layout: measuring must not convert the caller's model.
    run = make_runner(model, path, calibration=calibration, workdir=folder, keep_float=keep_float,
                      channels_last=None if path == "eager" else True)  # fmt: skip
    if warm:
        run(x)  # the first call: winograd measures its kernels, the engines allocate
    return run


def _shape(x: torch.Tensor) -> str:
    return f"{x.shape[0]}x{x.shape[2]}x{x.shape[3]}"


def _first_line(e: BaseException) -> str:
    return first_line(e)[:120]


def _built(model, paths, x, calibration, folder) -> tuple[dict[str, Runner], dict[str, str]]:
    """Every path of ``paths`` built and run once; those that fail are left out with the reason."""
    import warnings

    runs, rejected = {}, {}
    for path in paths:
        try:
            with warnings.catch_warnings():  # int8's low-agreement warning: the measurement judges agreement itself
                warnings.simplefilter("ignore")
                runs[path] = _build(model, path, x, calibration, folder)
        except BUILD_ERRORS as e:
            rejected[path] = _first_line(e)
    return runs, rejected


def _timed(runs: dict[str, Runner], x: torch.Tensor, timer: Timer) -> dict[str, float]:
    """Median milliseconds of each runner over :data:`ROUNDS` alternating rounds (a slow drift of the machine hits
    all alike); a runner :data:`DROP_SLOWER` times slower than the fastest after the first round is not run again."""
    times: dict[str, list[float]] = {p: [] for p in runs}
    for r in range(ROUNDS):
        for path, run in runs.items():
            if r and min(times[path]) > DROP_SLOWER * min(min(t) for t in times.values()):
                continue
            times[path].append(timer(path, run, x))
    return {p: statistics.median(t) for p, t in times.items()}


def _reduced_agreement(model, runs, calibration, choice: Choice, x, folder) -> dict[str, list[str]]:
    """Judge each reduced path against eager fp32 on ``calibration``; one short of the bar is dropped, int8 first
    retried with its costliest layers in float where they have been ranked. Returns the layers each int8 path
    keeps in float beyond the model's own."""
    reference, floats = runs["eager"], {}
    for path in [p for p in runs if p in REDUCED_PATHS]:
        share = agreement(runs[path], reference, calibration, model)
        for keep in float_tries(model) if share < REDUCED_MIN_AGREEMENT and path.endswith("int8") else ():
            built = _built_with_float(model, path, x, calibration, folder, keep)
            share_k = agreement(built, reference, calibration, model) if built else 0.0
            if share_k > share:
                runs[path], share, floats[path] = built, share_k, keep
            if share >= REDUCED_MIN_AGREEMENT:
                break
        choice.agreement[path] = share
        if share < REDUCED_MIN_AGREEMENT:
            choice.rejected[path] = f"{100 * share:.2f}% < {100 * REDUCED_MIN_AGREEMENT:.1f}% of fp32's labels"
            del runs[path]
    return floats


def float_tries(model: nn.Module) -> list[list[str]]:
    """The layers int8 short of the bar is retried with in float, in order: the layer each of the model's
    :meth:`~fcnseg.models.base.SegmentationModel.rescaled_pairs` quantises (conv1_2, fed the float first layer's
    output: the int8 paths kept it in float until fcnseg rescaled that output's channels, and without VNNI it is
    the one NNCF gives 7-bit weights), then the costliest 1, 2, 4 layers of a saved sensitivity ranking."""
    seconds = [b for _, b in model.rescaled_pairs()]
    ranking = saved_sensitivity(model)
    return ([seconds] if seconds else []) + ([ranking[:k] for k in FLOAT_TRIES] if ranking else [])


def _built_with_float(model, path, x, calibration, folder, keep) -> Runner | None:
    try:
        return _build(model, path, x, calibration, folder, keep)
    except BUILD_ERRORS:
        return None


def measure(
    model: nn.Module,
    auto: str,
    x: torch.Tensor,
    calibration: Sequence[torch.Tensor] = (),
    *,
    timer: Timer = time_once,
    workdir: str | os.PathLike | None = None,
) -> tuple[Choice, Runner]:
    """Build every candidate of ``auto`` on ``x``, judge the reduced ones on ``calibration`` (default: ``x``),
    time them with ``timer`` and take the fastest: the :class:`Choice` and the chosen path's runner."""
    reduced = auto == "auto-reduced"
    with build_folder(model, workdir, "fcnseg-auto-") as folder:  # the candidates' exports
        calibration = list(calibration) or [x[:1]]
        paths = candidates(reduced)
        runs, rejected = _built(model, paths, x, calibration, folder)
        choice = Choice(auto, "eager", {}, rejected=rejected, size=_shape(x))
        if "eager" not in runs:  # the reference itself failed: nothing to compare with
            raise FcnsegError(f"runtime {auto}: eager fp32 failed on this input ({rejected.get('eager')})")
        floats = _reduced_agreement(model, runs, calibration, choice, x, folder) if reduced else {}
        choice.ms = _timed(runs, x, timer)
        choice.path = min(choice.ms, key=choice.ms.__getitem__)
        choice.keep_float = floats.get(choice.path, [])
        return choice, runs[choice.path]


def _only_one(auto: str) -> str:
    if os.environ.get("FCNSEG_AUTO_PATHS"):
        return f"the only candidate FCNSEG_AUTO_PATHS={os.environ['FCNSEG_AUTO_PATHS']} leaves; nothing measured"
    return "the only path installed that this CPU runs at speed; nothing measured"


def choose(
    model: nn.Module,
    auto: str,
    x: torch.Tensor,
    calibration: Sequence[torch.Tensor] = (),
    *,
    timer: Timer = time_once,
    workdir: str | os.PathLike | None = None,
) -> tuple[Choice, Runner]:
    """``auto``'s path for ``model`` on inputs like ``x``: the cached choice (:func:`choice_key`) built, else
    :func:`measure`'s, saved. Only candidates with a single path (``FCNSEG_AUTO_PATHS=eager``) skip it all."""
    paths = candidates(auto == "auto-reduced")
    size, calibration = _shape(x), list(calibration) or [x[:1]]
    if len(paths) == 1:
        note = _only_one(auto)
        return Choice(auto, paths[0], {}, size=size, note=note), _build(model, paths[0], x, calibration, workdir,
                                                                       warm=False)  # fmt: skip
    key = choice_key(model, auto, x, paths)
    saved = cached_choice(key, auto, paths)
    built = _cached_build(model, saved, x, calibration, workdir) if saved is not None else None
    if built is not None:
        return saved, built
    choice, run = measure(model, auto, x, calibration, timer=timer, workdir=workdir)
    if not _save(choices_path(), key, {k: v for k, v in asdict(choice).items() if k != "cached"}):
        print(f"runtime {auto}: cannot write {choices_path()}; the next run measures again", file=sys.stderr)
    return choice, run


def _cached_build(model, saved: Choice, x, calibration, workdir) -> Runner | None:
    """The saved choice's path built; None, said on stderr, where it fails to build, or where a reduced path keeps
    fewer than :data:`REDUCED_MIN_AGREEMENT` of eager fp32's labels on these calibration images (it was judged on
    the images of the run that measured it): then the choice is measured again."""
    try:
        built = _build(model, saved.path, x, calibration, workdir, saved.keep_float, warm=False)
    except BUILD_ERRORS as e:
        print(f"runtime {saved.auto}: the cached {saved.path} failed ({_first_line(e)}); measuring again",
              file=sys.stderr)  # fmt: skip
        return None
    if saved.path in REDUCED_PATHS:
        reference = _build(model, "eager", x, calibration, None, warm=False)
        share = saved.agreement[saved.path] = agreement(built, reference, calibration, model)
        if share < REDUCED_MIN_AGREEMENT:
            bar = f"{100 * REDUCED_MIN_AGREEMENT:.1f}%"
            print(f"runtime {saved.auto}: the cached {saved.path} keeps {100 * share:.2f}% of fp32's labels on these "
                  f"calibration images (< {bar}); measuring again", file=sys.stderr)  # fmt: skip
            return None
    return built
