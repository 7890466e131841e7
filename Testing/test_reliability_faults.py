"""Faults during a run: cancel, out of memory, full or read-only disks, a killed writer, very large
volumes. Whatever happens, AttnSeg ends with one clear line and never leaves a half-written result or
touches a user's earlier results.

``attnseg`` subprocesses run with their stderr on a pseudo-terminal, so the progress bar is drawn and
the test can act at a known moment (once prediction has started). Mounting tmpfs folders (read-only,
or nearly full) needs root; tests run as root in CI containers, where permission bits do not stop
writes, and elsewhere those tests say so and skip.
"""
from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from AttnSegLib import models
from AttnSegLib.cli import MIN_FREE_BYTES, main
from AttnSegLib.image import Geometry, Image, read_image, write_image
from AttnSegLib.inference import Predictor
from AttnSegLib.models.base import SegmentationNetwork
from AttnSegLib.package import save_package

ATTNSEG = Path(sys.executable).with_name("attnseg")
CLASSES = [{"value": 0, "name": "background"}, {"value": 1, "name": "Anterior"},
           {"value": 2, "name": "Posterior"}]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_card(**inference) -> dict:
    return {"name": "faults_unet", "architecture": {"name": "unet", "kwargs": {"features": [4, 8]}},
            "modalities": [{"name": "T1", "normalization": "zscore"}], "classes": CLASSES,
            "patch_size_dhw": [16, 32, 16], "spacing_xyz_mm": [1.0, 1.0, 1.0], "orientation": "RAS",
            "inference": {"overlap": 0.5, "batch_size": 2, **inference}}


@pytest.fixture(scope="module")
def package_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = models.build("unet", 1, 3, features=[4, 8])
    return save_package(tmp_path_factory.mktemp("package") / "faults_unet", small_card(), net.state_dict()).path


@pytest.fixture(scope="module")
def large_case(tmp_path_factory, hippocampus_case) -> Path:
    """A 140 x 204 x 140 volume (the real case tiled 4 x 4 x 4): long enough to predict that a
    signal reliably lands mid-prediction."""
    image = read_image(hippocampus_case[0])
    array = np.tile(image.array, (4, 4, 4))
    path = tmp_path_factory.mktemp("large") / "large.nii.gz"
    write_image(Image(array, Geometry(tuple(reversed(array.shape)), (1.0,) * 3, (0.0,) * 3, image.geometry.direction)),
                path)
    return path


def run_until_predicting(args: list[str], then, timeout: float = 240) -> tuple[int, str]:
    """Run ``attnseg`` with stderr on a pseudo-terminal; call ``then(process)`` once the progress bar
    shows the predict stage. -> (exit status, everything written to stderr)."""
    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal 120 columns wide
    # Ctrl-C reaches a command run at a terminal; a test runner started in the background inherits
    # SIGINT ignored (POSIX shells do that to background jobs), so the child gets the default back.
    process = subprocess.Popen([str(ATTNSEG), *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=child, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    os.close(child)
    output, acted, deadline = b"", False, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([parent], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(parent, 4096)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
            if not acted and b"predict" in output:
                then(process)
                acted = True
            if process.poll() is not None and not ready:
                break
        status = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
        os.close(parent)
    assert acted, f"prediction never started: {output.decode(errors='replace')}"
    return status, output.decode(errors="replace").replace("\r", "\n")


def error_lines(stderr: str) -> list[str]:
    return [line.strip() for line in stderr.splitlines() if line.strip().startswith("attnseg: ")]


# -- cancel ----------------------------------------------------------------------------------------
def test_ctrl_c_mid_prediction_leaves_no_output(package_dir, large_case, tmp_path):
    out = tmp_path / "out"
    status, stderr = run_until_predicting(["segment", "-i", str(large_case), "-o", str(out), "--model", str(package_dir)],
                                          lambda process: process.send_signal(signal.SIGINT))
    assert status == 130, stderr
    assert "Traceback" not in stderr
    assert error_lines(stderr) == ["attnseg: cancelled; no partial results were written"]
    assert sorted(p.name for p in out.rglob("*")) == []  # no result, no hidden staging folder


def test_sigterm_mid_prediction_keeps_the_previous_results(package_dir, large_case, tmp_path):
    """A batch system's stop (SIGTERM) during an --overwrite run: cancelled like Ctrl-C, and the
    results already in the folder are untouched."""
    out = tmp_path / "out"
    out.mkdir()
    earlier = {name: f"earlier {name}".encode() for name in ("labels.nii.gz", "probabilities.nii.gz", "report.json")}
    for name, data in earlier.items():
        (out / name).write_bytes(data)
    status, stderr = run_until_predicting(
        ["segment", "-i", str(large_case), "-o", str(out), "--model", str(package_dir), "--overwrite"],
        lambda process: process.send_signal(signal.SIGTERM))
    assert status == 130, stderr
    assert error_lines(stderr) == ["attnseg: cancelled; no partial results were written"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier


# -- out of memory -----------------------------------------------------------------------------------
class OutOfMemoryAboveOneWindow(SegmentationNetwork):
    """FAULT INJECTION — CI has no GPU, so a real CUDA out-of-memory cannot happen here. This wraps
    a real network and raises the error the allocator would (``torch.OutOfMemoryError`` from CUDA, a
    plain RuntimeError from the CPU allocator) whenever more than ``limit`` windows come at once."""

    def __init__(self, inner: SegmentationNetwork, error: Exception, limit: int = 1):
        super().__init__()
        self.inner, self.error, self.limit = inner, error, limit
        self.batches: list[int] = []

    def forward(self, x):
        self.batches.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise self.error
        return self.inner(x)


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 4294967296 bytes. Error code 12 (Cannot allocate memory)"),
    RuntimeError("Seems to be OOM. Please try smaller patch size or mode='constant' instead of mode='gaussian'."),
], ids=["cuda_out_of_memory", "cpu_allocator", "monai_sliding_window"])
def test_out_of_memory_halves_the_window_batch_and_finishes(error, hippocampus_case):
    torch.manual_seed(0)
    inner = models.build("unet", 1, 3, features=[4, 8])
    image = read_image(hippocampus_case[0])
    flaky = OutOfMemoryAboveOneWindow(inner, error)
    result = Predictor(flaky, card=small_card(batch_size=4), device="cpu").predict([image])
    assert result.notices[-2:] == ["out of memory on cpu; retrying with 2 window(s) per batch",
                                   "out of memory on cpu; retrying with 1 window(s) per batch"]
    assert flaky.batches[:2] == [4, 2] and set(flaky.batches[2:]) == {1}
    assert result.provenance["window_batch"] == 1
    steady = Predictor(inner, card=small_card(batch_size=1), device="cpu").predict([image])
    np.testing.assert_allclose(result.probabilities.array, steady.probabilities.array, atol=1e-6)


def test_out_of_memory_with_one_window_on_the_cpu_is_one_clear_error(hippocampus_case):
    always = OutOfMemoryAboveOneWindow(models.build("unet", 1, 3, features=[4, 8]),
                                       torch.OutOfMemoryError("out of memory"), limit=0)
    with pytest.raises(MemoryError, match="out of memory on the CPU with one window at a time; close other "
                                          "programs or use a smaller volume"):
        Predictor(always, card=small_card(batch_size=2), device="cpu").predict([read_image(hippocampus_case[0])])


def test_other_runtime_errors_are_not_taken_for_out_of_memory(hippocampus_case):
    broken = OutOfMemoryAboveOneWindow(models.build("unet", 1, 3, features=[4, 8]),
                                       RuntimeError("mat1 and mat2 shapes cannot be multiplied"), limit=0)
    predictor = Predictor(broken, card=small_card(batch_size=2), device="cpu")
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        predictor.predict([read_image(hippocampus_case[0])])
    assert predictor.batch_size == 2 and broken.batches == [2]


# -- full and read-only disks --------------------------------------------------------------------------
@pytest.fixture
def mounted_tmpfs(tmp_path):
    """``mount(options) -> folder``: a tmpfs on a fresh folder, unmounted afterwards.

    As root (CI containers) chmod does not stop writes — root ignores permission bits — but the
    kernel refuses writes to a read-only mount and to a full tmpfs whatever the privileges. Mounting
    needs root (CAP_SYS_ADMIN); without it the test says so and skips.
    """
    mounted = []

    def mount(options: str) -> Path:
        folder = tmp_path / f"mount{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); needs root")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


def _segment_in_process(capsys, package_dir, image: Path, out: Path) -> tuple[int, str, list[str]]:
    status = main(["segment", "-i", str(image), "-o", str(out), "--model", str(package_dir)])
    captured = capsys.readouterr()
    return status, captured.out, [line for line in captured.err.splitlines() if line.strip()]


def test_read_only_output_folder_fails_before_any_work(package_dir, hippocampus_case, mounted_tmpfs, tmp_path, capsys):
    if os.geteuid() == 0:
        folder, reason = mounted_tmpfs("ro,size=1m"), "Read-only file system"
    else:  # a normal user: permission bits are enough
        folder, reason = tmp_path / "read_only", "Permission denied"
        folder.mkdir()
        folder.chmod(0o555)
    status, out, lines = _segment_in_process(capsys, package_dir, hippocampus_case[0], folder / "out")
    assert status == 2 and out == ""
    assert lines == [f"attnseg: error: cannot write to {folder / 'out'} ({reason}); choose a writable --output"]


def test_full_disk_fails_before_any_work(package_dir, hippocampus_case, mounted_tmpfs, capsys):
    folder = mounted_tmpfs("size=1m")
    (folder / "filler").write_bytes(b"\0" * (512 * 1024))
    assert shutil.disk_usage(folder).free < MIN_FREE_BYTES
    status, out, lines = _segment_in_process(capsys, package_dir, hippocampus_case[0], folder / "out")
    assert status == 2 and out == ""
    assert lines == [f"attnseg: error: the disk holding {folder / 'out'} is full (0.5 MiB free); free some space "
                     "or choose another --output"]
    assert list((folder / "out").iterdir()) == []


def _fill(folder: Path) -> None:
    """Write zeros into ``folder`` until its file system is full."""
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass


def test_disk_filling_up_during_the_run_fails_cleanly(package_dir, large_case, mounted_tmpfs):
    """The disk fills while the model predicts (another program writing): writing the results fails
    with one line, nothing is left behind, and no truncated file carries a result's name. (ITK's
    NIfTI writer alone only warns and leaves a short file; the engine checks it against its header.)"""
    folder = mounted_tmpfs("size=80m")
    out = folder / "out"
    status, stderr = run_until_predicting(["segment", "-i", str(large_case), "-o", str(out), "--model",
                                           str(package_dir), "--overlap", "0"], lambda process: _fill(folder))
    assert status == 2, stderr
    assert "Traceback" not in stderr
    lines = error_lines(stderr)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"attnseg: error: could not write the results into {out} ("), lines
    assert lines[0].endswith("it was left as it was — free some disk space or choose another --output"), lines
    assert list(out.iterdir()) == []


# -- a writer killed mid-write -------------------------------------------------------------------------
WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from AttnSegLib.image import Geometry, Image, write_image
    geometry = Geometry((96, 96, 96), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    versions = [np.random.default_rng(seed).random((96, 96, 96), dtype=np.float32) for seed in (0, 1)]
    for n in range(1000):
        write_image(Image(versions[n % 2], geometry), sys.argv[1])
        print(n, flush=True)
""")


def test_a_writer_killed_mid_write_never_leaves_a_truncated_file(tmp_path):
    """``kill -9`` (no cleanup can run) at four moments of repeated writes: the file at the result's
    name is always one complete version; only hidden temporary names are left, and their presence
    shows the kills did land mid-write."""
    versions = [np.random.default_rng(seed).random((96, 96, 96), dtype=np.float32) for seed in (0, 1)]
    interrupted = 0
    for attempt, delay_s in enumerate((0.0, 0.07, 0.15, 0.3)):
        folder = tmp_path / str(attempt)
        folder.mkdir()
        target = folder / "labels.nii.gz"
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
        try:
            assert writer.stdout.readline().strip() == "0"  # one complete write happened
            time.sleep(delay_s)
        finally:
            writer.send_signal(signal.SIGKILL)
            writer.wait()
        written = read_image(target).array
        assert any(np.array_equal(written, v) for v in versions)
        leftovers = [p.name for p in folder.iterdir() if p.name != target.name]
        assert all(name.startswith(f".{target.name}.") for name in leftovers), leftovers
        interrupted += bool(leftovers)
    assert interrupted >= 1, "no kill landed mid-write; the test proved nothing"


# -- very large volumes ----------------------------------------------------------------------------------
MEMORY_PROBE = textwrap.dedent("""
    import json, resource, sys
    import numpy as np, torch
    torch.set_num_threads(1)
    from AttnSegLib.image import Geometry, Image
    from AttnSegLib.inference import Predictor
    from AttnSegLib.models.base import SegmentationNetwork, SegOutput

    class Pointwise(SegmentationNetwork):
        # the cheapest real network (a 1x1x1 convolution): what is measured is the Predictor
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(1, 3, 1)
            self.largest_window = 0
        def forward(self, x):
            self.largest_window = max(self.largest_window, x.numel())
            return SegOutput(self.conv(x), {}, {})

    n, patch = int(sys.argv[1]), 64
    card = {"name": "memory", "architecture": {"name": "pointwise"}, "modalities": [{"name": "T1"}],
            "classes": [{"value": 0, "name": "background"}, {"value": 1, "name": "a"}, {"value": 2, "name": "b"}],
            "patch_size_dhw": [patch] * 3, "spacing_xyz_mm": [1.0] * 3, "orientation": "LPS",
            "inference": {"overlap": 0.25, "batch_size": 2}}
    network = Pointwise()
    predictor = Predictor(network, card=card, device="cpu")
    identity = (1, 0, 0, 0, 1, 0, 0, 0, 1)
    small = np.random.default_rng(1).integers(0, 1000, (patch,) * 3, dtype=np.int16)
    predictor.predict([Image(small, Geometry((patch,) * 3, (1.0,) * 3, (0.0,) * 3, identity))])  # warm up
    volume = np.random.default_rng(0).integers(0, 1000, (n, n, n), dtype=np.int16)
    image = Image(volume, Geometry((n, n, n), (1.0,) * 3, (0.0,) * 3, identity))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = predictor.predict([image])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(json.dumps({"extra_peak_bytes": peak, "largest_window": network.largest_window,
                      "labels": list(result.labels.array.shape), "notices": result.notices}))
""")


def test_predictor_peak_memory_on_a_256_cubed_volume_stays_within_its_arrays(tmp_path):
    """Peak memory of ``Predictor.predict`` on a 256^3 int16 volume, one modality, three classes,
    measured as the growth of the process's peak resident set (fresh process, after a warm-up).

    With V = one float32 volume (64 MiB), the Predictor needs: the model-frame input (M = 1 V, the
    int16 input itself is the caller's); MONAI's blended accumulators, probabilities (C = 3 V) plus
    their weight map (1 V); afterwards the probabilities (3 V), the uncertainty map (1 V), one volume
    of scratch and the uint8 labels (1/4 V). So the bound is (M + C + 2) V = 6 V, plus 64 MiB for
    per-window buffers and allocator slack that do not grow with the volume. The network itself
    only ever sees window batches (2 x 64^3 voxels), never the volume.
    """
    n = 256
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(n)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    volume = n**3 * 4
    bound = (1 + 3 + 2) * volume + 64 * 2**20
    assert measured["labels"] == [n, n, n]
    assert measured["largest_window"] == 2 * 64**3
    assert measured["extra_peak_bytes"] <= bound, (
        f"peak grew by {measured['extra_peak_bytes'] / volume:.2f} float32 volumes; bound {bound / volume:.2f}")
    print(f"256^3: peak +{measured['extra_peak_bytes'] / 2**20:.0f} MiB = "
          f"{measured['extra_peak_bytes'] / volume:.2f} float32 volumes (bound {bound / 2**20:.0f} MiB)")
