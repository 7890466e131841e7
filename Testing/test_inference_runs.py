"""A Predictor keeps nothing between calls: an out-of-memory fallback lasts for the call that needed it.

The out-of-memory error is real: a child process lowers its own address-space limit (``RLIMIT_AS``)
between what one window needs and what a batch of four needs, so PyTorch's CPU allocator fails
("DefaultCPUAllocator: can't allocate memory") and the Predictor halves the window batch; the limit is
then lifted and the same Predictor runs again.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from AttnSegLib import models
from AttnSegLib.errors import AttnSegError, OutOfMemory
from AttnSegLib.inference import Predictor, deterministic

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import json, resource, sys
    import numpy as np, torch
    from AttnSegLib import models
    from AttnSegLib.image import Geometry, Image
    from AttnSegLib.inference import Predictor

    def vm_peak():
        for line in open("/proc/self/status"):
            if line.startswith("VmPeak:"):
                return int(line.split()[1]) * 1024

    torch.manual_seed(0)
    network = models.build("unet", 1, 2, features=[8, 16])
    card = {"name": "oom_unet", "architecture": {"name": "unet", "kwargs": {"features": [8, 16]}},
            "modalities": [{"name": "T1", "normalization": "zscore"}],
            "classes": [{"value": 0, "name": "background"}, {"value": 1, "name": "structure"}],
            "patch_size_dhw": [64, 64, 64], "inference": {"overlap": 0.5, "batch_size": 4}}
    rng = np.random.default_rng(0)
    image = Image(rng.normal(size=(64, 128, 128)).astype(np.float32), Geometry((128, 128, 64), (1.0, 1.0, 1.0),
                  (0.0, 0.0, 0.0), tuple(np.eye(3).ravel())))
    one = Predictor(network, card=card, device="cpu", batch_size=1, with_maps=False).predict([image])
    peak_one = vm_peak()
    predictor = Predictor(network, card=card, device="cpu", with_maps=False)
    predictor.predict([image])
    peak_four = vm_peak()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, ((peak_one + peak_four) // 2, hard))
    try:
        squeezed = predictor.predict([image])
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    normal = predictor.predict([image])
    print(json.dumps({
        "peak_one_mb": peak_one / 2**20, "peak_four_mb": peak_four / 2**20,
        "squeezed": {"notices": squeezed.notices, "provenance": squeezed.provenance},
        "normal": {"notices": normal.notices, "provenance": normal.provenance},
        "predictor": {"batch_size": predictor.batch_size, "device": str(predictor.device)},
        "squeezed_matches_one_window": bool(np.allclose(squeezed.probabilities.array, one.probabilities.array,
                                                        atol=1e-5)),
        "normal_matches_one_window": bool(np.allclose(normal.probabilities.array, one.probabilities.array,
                                                      atol=1e-5)),
    }))
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists() or sys.platform != "linux",
                    reason="the address-space limit and /proc are Linux's")
def test_out_of_memory_fallback_lasts_one_call(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "AttnSegExtension"), str(REPO)])}
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\nVmPeak one window {report['peak_one_mb']:.0f} MB, four windows {report['peak_four_mb']:.0f} MB")
    squeezed, normal = report["squeezed"], report["normal"]
    assert squeezed["notices"][0] == "out of memory on cpu; retrying with 2 window(s) per batch"
    assert squeezed["provenance"]["window_batch"] in (1, 2)
    assert report["squeezed_matches_one_window"]
    # The next call on the same Predictor: its own settings again, no notice, the same answer.
    assert normal["notices"] == []
    assert normal["provenance"]["window_batch"] == 4 and normal["provenance"]["device"] == "cpu"
    assert report["predictor"] == {"batch_size": 4, "device": "cpu"}
    assert report["normal_matches_one_window"]


def test_validation_predictor_never_falls_back():
    """``fallback=False`` (training's validation): the first out-of-memory error is one AttnSegError, and the
    network stays where it was."""
    network = models.build("unet", 1, 2, features=[4, 8])
    card = {"name": "tiny", "architecture": {"name": "unet", "kwargs": {"features": [4, 8]}},
            "modalities": [{"name": "T1"}], "classes": [{"value": 0, "name": "bg"}, {"value": 1, "name": "fg"}],
            "patch_size_dhw": [256, 256, 256]}
    predictor = Predictor(network, card=card, device="cpu", with_maps=False, fallback=False)
    # A real allocation failure: padding the input to one 256^3 window (64 MiB) under an address-space
    # limit 16 MiB above what the process holds.
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (current_vm() + 16 * 2**20, hard))
    try:
        with pytest.raises(OutOfMemory, match="out of memory on cpu with 2 window") as error:
            predictor.predict_array(np.zeros((1, 8, 8, 8), dtype=np.float32))
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert isinstance(error.value, AttnSegError)
    assert next(network.parameters()).device.type == "cpu" and predictor.batch_size == 2


def current_vm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize in /proc/self/status")


def test_determinism_is_a_context_that_restores_the_global_flags():
    cudnn = torch.backends.cudnn
    before = cudnn.benchmark, cudnn.deterministic
    cudnn.benchmark, cudnn.deterministic = True, False
    try:
        with deterministic(torch.device("cuda")):
            assert (cudnn.benchmark, cudnn.deterministic) == (False, True)
        assert (cudnn.benchmark, cudnn.deterministic) == (True, False)
        with deterministic(torch.device("cpu")):
            assert (cudnn.benchmark, cudnn.deterministic) == (True, False)
    finally:
        cudnn.benchmark, cudnn.deterministic = before
