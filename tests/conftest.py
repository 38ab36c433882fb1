import atexit
import os
import shutil
import tempfile

import pytest

from fcnseg._memory import request_huge_pages

# Large CPU tensors on huge pages in the workers too, as in the `fcnseg` processes the tests start (before torch is
# imported: fcnseg._memory says why).
request_huge_pages()

import torch  # noqa: E402

from tests.helpers import hub  # noqa: E402, F401  (hub: a fixture, found here by every test)

# Two cores here and in CI: keep torch from oversubscribing them when pytest runs, with its workers (pytest-xdist's
# -n, the default in pyproject.toml) sharing the cores between them. The processes the tests start (fcnseg predict,
# serve, train) take the same count, so that on a machine of more cores they still choose the same convolution
# kernels as this process does when their outputs are compared with its own.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, os.cpu_count() or 1) // WORKERS)
torch.set_num_threads(THREADS)
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

# `--runtime auto` (the CLI's default) picks its path by measurement, or from the CPU's features where it has no
# input to measure on. The suite pins the probe to a CPU without AVX2, where the feature-based choice is eager, so
# that outputs compared across processes (predict against serve, a run against its resume) are computed alike on
# any machine; tests/test_auto_runtime.py covers each feature combination, and tests/test_kernels.py the Winograd
# path itself. Measured kernel choices go to a folder of this run's own.
os.environ["FCNSEG_CPU_FEATURES"] = "sse4_2"
# auto measures its candidates on the first input (fcnseg.runtime.choice): the suite narrows them to eager, so that
# a test's first prediction does not build every engine; tests/test_choice.py measures for real.
os.environ["FCNSEG_AUTO_PATHS"] = "eager"
# Built ONNX and OpenVINO files are kept between processes, named by a hash of the model (fcnseg.runtime.engines).
# Tests that build the same random weights would then skip the export or quantisation a later one patches or
# checks: every build here starts afresh, and tests/test_engine_cache.py turns the cache on.
os.environ["FCNSEG_ENGINE_CACHE"] = "0"
# The pytest process that makes the folder removes it at exit; its workers and the processes the tests start inherit
# the variable and share the folder.
if "FCNSEG_CACHE_DIR" not in os.environ:
    os.environ["FCNSEG_CACHE_DIR"] = tempfile.mkdtemp(prefix="fcnseg-test-cache-")
    atexit.register(shutil.rmtree, os.environ["FCNSEG_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """`fcnseg demo --quick`, run once per session, whichever pytest worker asks first (the others wait for it):
    (output folder, printed text). Its trained FCN-8s and the synthetic images are the demo model and demo images
    that the fast-inference tests check agreement on."""
    import contextlib
    import io

    from filelock import FileLock

    from fcnseg.cli import main

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the workers' base folders sit side by side in the session's
    out, text = shared / "quick-demo" / "demo", shared / "quick-demo" / "printed.txt"
    with FileLock(str(shared / "quick-demo.lock")):
        if not text.exists():
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                assert main(["demo", "--quick", "--quiet", "--out", str(out)]) == 0
            text.write_text(printed.getvalue())
    return out, text.read_text()
