"""The benchmark scripts' own plumbing: what they time must be what they name."""

import warnings

import torch

import fcnseg
from benchmarks import vs_torchfcn
from fcnseg.runtime import make_runner
from tests.helpers import TINY, randomise


def test_the_peer_engines_run_the_files_onnx_int8_built(tmp_path):
    model = randomise(fcnseg.get_model("fcn8s", num_classes=3, alignment="aligned", **TINY), seed=4).eval()
    calibration = [torch.randn(1, 3, 40, 56, generator=torch.Generator().manual_seed(0))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # int8 on random weights may warn of its agreement
        ort_int8 = make_runner(model, "onnx-int8", calibration=calibration, workdir=tmp_path)
    fp32, int8 = vs_torchfcn.built_files(model, calibration, tmp_path)
    assert fp32.is_file() and int8.is_file()  # the peers' files, whether or not OpenVINO is there to run them
    peers = vs_torchfcn.peer_engines(fp32, int8)
    x = torch.randn(1, 3, 45, 61, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        eager = model(x)
    quantised = ort_int8(x)

    def gap(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().mean() / (eager.max() - eager.min()))

    for name, run in peers.items():
        out = run(x)
        assert out.shape == eager.shape, name
        if "int8" in name:  # OpenVINO on the QDQ file: nearer ONNX Runtime's int8 on that file than fp32
            assert gap(out, quantised) < gap(out, eager), name
        elif "fp32" in name or "(f32)" in name:  # ONNX Runtime fp32, OpenVINO with f32 forced: the fp32 export
            assert gap(out, eager) < 1e-4, name
