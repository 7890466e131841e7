"""The worker process end to end on real MRML (slicer-core): the logic copies volume nodes out, a real
worker process (this Python, as Slicer would start PythonSlicer) runs the real engine, the logic loads
the result files into the scene. Cancel, a stalled worker, a killed worker (what the out-of-memory
killer does), a worker out of address space, and a bad request are each run for real, and the main
thread's longest stall is measured while a whole-head volume segments."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.torch import load_file

from AttnSegLib.image import Geometry, Image, read_image
from AttnSegLib.inference import Cancelled, Predictor
from AttnSegLib.package import default_package, load_package, save_package
from AttnSegLib.mrml import imageFromVolumeNode, newScene, volumeNodeFromImage
from AttnSegLib.slicer_logic import SceneLogic
from AttnSegLib.worker_client import CANCEL_GRACE_S, WorkerCrashed, WorkerError, WorkerProcess, WorkerTask, \
    workerCommand
from test_slicer_logic import HIPPOCAMPUS_CLASSES, SAMPLE_IMAGE, _untrained_package

POLL_S = 0.2  # the widget's QTimer interval
posix_signals = pytest.mark.skipif(os.name == "nt", reason="SIGSTOP and SIGKILL are POSIX signals")
MNI_T1 = "mni152/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return _untrained_package(tmp_path_factory.mktemp("packages") / "worker", "difficulty_aware",
                              {"base_features": 4, "depth": 3},
                              [{"name": "T1", "contrast": "T1-weighted MRI", "normalization": "zscore"}],
                              HIPPOCAMPUS_CLASSES, "worker")


@pytest.fixture(scope="module")
def logic():
    """One logic, hence one worker process, for the module: it is kept alive between runs."""
    logic = SceneLogic(newScene(), workerEnvironment={**os.environ, "OMP_NUM_THREADS": "1"})
    yield logic
    logic.shutdownWorker()


@pytest.fixture(scope="module")
def big_volume(logic):
    """The sample tiled into a 140 x 204 x 140 volume: enough windows for a run of several seconds."""
    image = read_image(SAMPLE_IMAGE)
    tiled = np.tile(image.array, (4, 4, 4))
    geometry = Geometry(tuple(reversed(tiled.shape)), image.geometry.spacing, image.geometry.origin,
                        image.geometry.direction)
    return volumeNodeFromImage(Image(tiled, geometry), logic.scene, "tiled")


def _nodes(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def _first_progress(task: WorkerTask, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while task.progress[0] <= 0.0:
        assert not task.done(), f"the run ended before any progress: {task._outcome}"
        assert time.monotonic() < end, "no progress from the worker"
        time.sleep(0.02)


def _cancel_and_time(task: WorkerTask) -> float:
    """Seconds from Cancel to the task being done, polled as the widget polls."""
    start = time.monotonic()
    task.cancel()
    while not task.done():
        time.sleep(POLL_S / 4)
    return time.monotonic() - start


def test_a_run_in_the_worker_gives_the_engines_result_and_keeps_the_model_loaded(logic, package):
    volume = logic.loadVolume(SAMPLE_IMAGE)
    job = logic.prepare([volume], package, device="cpu", inProcess=False)
    assert job.predictor is None  # nothing of the network in the caller
    task = logic.startTask(job)
    reported = []
    while not task.done():
        reported.append(task.progress)
        time.sleep(0.02)
    result = task.result()
    assert task.device == "cpu" and task.progress == (1.0, 0.0, "done")
    fractions = [p[0] for p in reported if p[2] == "predict"]
    assert fractions == sorted(fractions) and any(p[1] is not None for p in reported if p[2] == "predict")

    engine = Predictor(package, device="cpu").predict([imageFromVolumeNode(volume)])
    np.testing.assert_array_equal(result.labels.array, engine.labels.array)
    np.testing.assert_allclose(result.probabilities.array, engine.probabilities.array, atol=1e-6)
    assert set(result.maps) == set(engine.maps) and result.review_map_name == engine.review_map_name
    assert result.labels.geometry.same_grid(engine.labels.geometry, tolerance=1e-9)
    added = logic.addResult(job, result)
    np.testing.assert_array_equal(logic.correctedLabels(added.segmentationNode).array, engine.labels.array)
    assert added.segmentationNode.GetAttribute("AttnSeg.ModelSha256") == package.sha256
    task.close()
    assert not task._folder.exists()  # the run's files are removed once the nodes are made

    pid = logic._worker.pid
    started = time.monotonic()
    again = logic.startTask(logic.prepare([volume], package, device="cpu", inProcess=False))
    assert again.wait(60)
    np.testing.assert_array_equal(again.result().labels.array, engine.labels.array)
    assert logic._worker.pid == pid  # the same process, the network already built
    print(f"\nsecond run in the kept worker: {time.monotonic() - started:.2f} s")


@pytest.mark.parametrize("size_factor", [None, 1.2])
def test_the_panels_roi_reaches_the_worker(logic, package, size_factor):
    """The panel runs the job in the worker: a markups ROI (rotated, as one moved in the views can be)
    gives the engine's result inside that box; one the localisation placed carries its head's size
    factor (the node's ``AttnSeg.SizeFactor``) to the worker, which samples the box size-normalised."""
    from AttnSegLib.localise import Box
    from AttnSegLib.mrml import roiBoxFromNode, roiNodeFromBox
    from AttnSegLib.slicer_logic import ATTRIBUTE

    volume = logic.loadVolume(SAMPLE_IMAGE)
    image = imageFromVolumeNode(volume)
    angle = np.deg2rad(20.0)
    axes = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    roi = roiNodeFromBox(Box(tuple(image.geometry.corners_lps().mean(axis=0)), (20.0, 24.0, 16.0),
                             tuple(axes.ravel())), logic.scene, "roi")
    if size_factor is not None:
        roi.SetAttribute(ATTRIBUTE + "SizeFactor", repr(size_factor))
    task = logic.startTask(logic.prepare([volume], package, device="cpu", inProcess=False, roiNode=roi))
    assert task.wait(60)
    result = task.result()
    engine = Predictor(package, device="cpu").predict([image], roi=roiBoxFromNode(roi), size_factor=size_factor)
    np.testing.assert_array_equal(result.labels.array, engine.labels.array)
    assert result.provenance["roi"] == engine.provenance["roi"]
    assert result.provenance["roi"].get("size_factor") == size_factor
    task.close()


def test_cancel_ends_a_run_within_a_second_and_the_worker_stays(logic, package, big_volume):
    scene = logic.scene
    before = _nodes(scene)
    task = logic.startTask(logic.prepare([big_volume], package, device="cpu", inProcess=False))
    pid = logic._worker.pid
    _first_progress(task)
    assert task.progress[0] < 0.5
    seconds = _cancel_and_time(task)
    print(f"\ncancel to done: {seconds:.3f} s")
    assert seconds < 1.0
    with pytest.raises(Cancelled):
        task.result()
    assert _nodes(scene) == before and not task._folder.exists()
    assert logic._worker.alive and logic._worker.pid == pid  # it stopped by itself: no restart needed


@posix_signals
def test_a_worker_that_does_not_stop_is_killed_and_the_next_run_gets_a_new_one(logic, package, big_volume):
    task = logic.startTask(logic.prepare([big_volume], package, device="cpu", inProcess=False))
    _first_progress(task)
    stalled = logic._worker.pid
    os.kill(stalled, signal.SIGSTOP)  # a worker stuck in one long native call
    seconds = _cancel_and_time(task)
    print(f"\ncancel to done, worker stopped with SIGSTOP: {seconds:.3f} s")
    assert CANCEL_GRACE_S <= seconds < 1.0
    with pytest.raises(Cancelled):
        task.result()
    assert "did not stop within 0.75 s and was restarted" in task.notices[0]
    assert not logic._worker.alive
    volume = logic.loadVolume(SAMPLE_IMAGE)
    fresh = logic.startTask(logic.prepare([volume], package, device="cpu", inProcess=False))
    assert fresh.wait(120) and fresh.result().labels.array.shape == (35, 51, 35)
    assert logic._worker.pid != stalled


@posix_signals
def test_a_killed_worker_fails_the_run_with_one_line_and_leaves_the_scene(logic, package, big_volume):
    scene = logic.scene
    before = _nodes(scene)
    task = logic.startTask(logic.prepare([big_volume], package, device="cpu", inProcess=False))
    _first_progress(task)
    os.kill(logic._worker.pid, signal.SIGKILL)  # what the kernel's out-of-memory killer does
    assert task.wait(5)
    with pytest.raises(WorkerCrashed) as error:
        task.result()
    message = str(error.value)
    assert "\n" not in message
    assert "the segmentation worker was killed (SIGKILL; the system may have run out of memory)" in message
    assert "nothing was added to the scene" in message
    assert _nodes(scene) == before
    volume = logic.loadVolume(SAMPLE_IMAGE)
    assert logic.startTask(logic.prepare([volume], package, device="cpu", inProcess=False)).wait(120)


def test_a_worker_that_cannot_start_says_why(package, big_volume):
    """A worker that exits at once (here: a Python that fails on start) fails the run with its exit code
    and the last line it wrote to stderr."""
    broken = WorkerProcess([sys.executable, "-c", "import sys; sys.stderr.write('no module named torch\\n'); "
                                                  "sys.exit(3)"])
    logic = SceneLogic(big_volume.GetScene())
    task = WorkerTask(broken, logic.prepare([big_volume], package, device="cpu", inProcess=False)).start()
    assert task.wait(30)
    with pytest.raises(WorkerCrashed, match=r"^the segmentation worker exited with code 3; its last message: "
                                            r"no module named torch; nothing was added to the scene"):
        task.result()
    broken.shutdown()


def test_a_bad_request_is_one_line_and_the_worker_serves_the_next(logic, package, tmp_path):
    copy = tmp_path / "changed"
    shutil.copytree(package.path, copy)
    changed = load_package(copy)
    volume = logic.loadVolume(SAMPLE_IMAGE)
    job = logic.prepare([volume], changed, device="cpu", inProcess=False)
    weights = load_file(copy / "weights.safetensors")
    first = next(iter(weights))
    weights[first] = weights[first] + 1.0
    save_package(copy, dict(changed.card), weights)  # re-exported, valid, after it was chosen
    task = logic.startTask(job)
    assert task.wait(60)
    with pytest.raises(WorkerError, match=r"model package .*changed since it was chosen .* choose the model again"):
        task.result()
    pid = logic._worker.pid
    good = logic.startTask(logic.prepare([volume], package, device="cpu", inProcess=False))
    assert good.wait(60) and good.result() is not None and logic._worker.pid == pid


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the address space size from Linux's /proc")
def test_a_worker_out_of_memory_leaves_the_caller_intact(package, big_volume, tmp_path):
    """The worker's address space is capped a little above what it holds once torch is imported: the
    run fails as out of memory (a MemoryError reported by the worker, or the worker dying), in one line."""
    cap = ("import resource, sys; sys.path.insert(0, sys.argv[1]); import AttnSegLib.worker as w, "
           "AttnSegLib.inference; "
           "vm = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) * 1024; "
           "resource.setrlimit(resource.RLIMIT_AS, (vm + (200 << 20), resource.RLIM_INFINITY)); w.main()")
    command = workerCommand()
    worker = WorkerProcess([command[0], "-c", cap, command[-1]], env={**os.environ, "OMP_NUM_THREADS": "1"})
    scene_logic = SceneLogic(big_volume.GetScene())
    before = _nodes(scene_logic.scene)
    task = WorkerTask(worker, scene_logic.prepare([big_volume], package, device="cpu", inProcess=False)).start()
    try:
        assert task.wait(300)
        with pytest.raises((MemoryError, WorkerCrashed)) as error:
            task.result()
        message = str(error.value)
        print(f"\nout of memory reported as {type(error.value).__name__}: {message}")
        assert "\n" not in message and "memory" in message.lower()
        assert _nodes(scene_logic.scene) == before
    finally:
        worker.shutdown()


def test_the_worker_speaks_json_lines_on_stdout_only(package, tmp_path):
    """The protocol by hand, as any client would speak it: ready, then started/progress/result lines."""
    from AttnSegLib.worker import geometryToDict, saveArray

    image = read_image(SAMPLE_IMAGE)
    request = {"op": "segment", "id": "r1", "model": str(package.path), "sha256": package.sha256, "device": "cpu",
               "inputs": [{"file": saveArray(image.array, tmp_path / "in.npy"), "geometry": geometryToDict(image.geometry)}],
               "output": str(tmp_path / "out")}
    lines = "\n".join([json.dumps(request), "not json", json.dumps({"op": "shutdown"})]) + "\n"
    run = subprocess.run(workerCommand(), input=lines.encode(), capture_output=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    messages = [json.loads(line) for line in run.stdout.decode().splitlines()]  # every line is JSON
    events = [m["event"] for m in messages]
    assert events[0] == "ready" and events[1] == "started" and "result" in events
    assert events[-1] == "error" and messages[-1]["kind"] == "ProtocolError" and messages[-1]["id"] is None
    assert messages[-1]["message"] == "unreadable request 'not json'; send one JSON object per line"
    result = next(m for m in messages if m["event"] == "result")
    labels = np.load(result["labels"], allow_pickle=False)
    assert labels.dtype == np.uint8 and labels.shape == image.array.shape
    assert set(result["maps"]) >= {"uncertainty", "difficulty"}


@pytest.mark.slow
def test_main_thread_stall_while_a_whole_head_volume_segments(data_dir):
    """The widget's work on the main thread, timed call by call, while the shipped default model runs on
    the MNI152 T1 head (197 x 233 x 189, 1 mm) in the worker: the click (prepare + start), every poll,
    reading the result, and each step of adding its nodes (the widget runs one step per Qt event)."""
    logic = SceneLogic(newScene(), workerEnvironment={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        volume = logic.loadVolume(data_dir / MNI_T1)
        package = default_package()
        warm = logic.startTask(logic.prepare([logic.loadVolume(SAMPLE_IMAGE)], package, "cpu", inProcess=False))
        assert warm.wait(300)  # the worker is started and the model built, as after a first run
        start = time.perf_counter()
        job = logic.prepare([volume], package, "cpu", inProcess=False)
        task = logic.startTask(job)
        click = time.perf_counter() - start
        polls = []
        began = time.perf_counter()
        while True:
            time.sleep(POLL_S)
            start = time.perf_counter()
            task.progress
            finished = task.done()
            polls.append(time.perf_counter() - start)
            if finished:
                break
        run = time.perf_counter() - began
        start = time.perf_counter()
        steps = logic.addResultSteps(job, task.result())
        added = [("read result", time.perf_counter() - start)]
        while True:
            start = time.perf_counter()
            try:
                name = next(steps)
            except StopIteration as done:
                result = done.value
                break
            added.append((name, time.perf_counter() - start))
        task.close()
        slowest = max(added, key=lambda step: step[1])
        print(f"\nwhole head {volume.GetImageData().GetDimensions()}: run {run:.1f} s, {len(polls)} polls "
              f"every {POLL_S} s; main thread held: poll max {max(polls) * 1000:.1f} ms "
              f"(99th percentile {np.percentile(polls, 99) * 1000:.2f} ms, median {np.median(polls) * 1000:.2f} ms), "
              f"click {click * 1000:.0f} ms, adding the result {sum(t for _, t in added) * 1000:.0f} ms in "
              f"{len(added)} steps, the longest {slowest[0]!r} {slowest[1] * 1000:.0f} ms; steps: "
              + ", ".join(f"{n} {t * 1000:.0f}" for n, t in added) + " ms (1 torch thread in the worker; shared machine)")
        assert len(result.mapNodes) >= 3
        assert np.percentile(polls, 99) < 0.02 and max(polls) < POLL_S
        assert slowest[1] < 2.0
    finally:
        logic.shutdownWorker()
