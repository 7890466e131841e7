"""One browser session of AttnSeg: a trame-slicer scene driven by :class:`SceneLogic`.

The page (built by :mod:`.page`) calls the methods here; they read and write the scene only through
the same :class:`~AttnSegLib.slicer_logic.SceneLogic` the Slicer module uses, and report back through
the typed state (:mod:`.state`). The network runs on a worker thread
(:class:`~AttnSegLib.segmentation_task.SegmentationTask`) that the server loop polls, so the views stay
interactive and the progress bar moves while a volume is segmented; its result is added to the scene
on the server loop, the scene's only thread. A click on a slice view in the Refine step is refined
the same way (:mod:`.refine_mode`).

Whatever a client sets in that state or passes to a trigger is checked against what this session
offered: volumes and models are chosen by name from the lists it sent, never by a path, and a header
whose voxels live in another file is never opened.

Nothing the user corrected is replaced without a question: segmenting again, switching model or
opening another volume over a corrected segmentation sets ``confirm`` and waits for
:meth:`AttnSegWebApp.answer`; the corrected segmentation can be kept beside the new result.
"""
from __future__ import annotations

import asyncio
import io
import logging
import math
import re
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from trame_server import Server
from trame_server.utils.asynchronous import create_task
from trame_server.utils.typed_state import TypedState
from trame_slicer import module as trame_slicer_module
from trame_slicer.app.logic import SegmentEditorLogic
from trame_slicer.app.ui import PaintEffectState, SegmentEditorState
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

from ..errors import AttnSegError, InputError
from ..image import (IMAGE_SUFFIXES, Geometry, ImageError, case_name, check_data_file, label_map_levels,
                     read_image, text_name, write_image)
from ..localise import Box
from ..outputs import detection_note, doubtful_rule, map_title, volumes_text
from ..package import PackageError, available_packages
from ..mrml import roiNodeFromBox, volumeGeometry
from ..segmentation_task import SegmentationTask
from ..slicer_logic import Cancelled, SceneLogic
from .page import TAB_STATE, build_page, slice_view_overlay
from .corrections import CorrectionsFolder
from .data_folder import offered_volumes, volume_title
from .refine_mode import ClickRefinement, click_choices, clicks_text, view_point_lps
from .regions_table import next_sort, region_rows, sorted_regions
from .state import AttnSegState
from .uploads import UploadError, check_upload, save_upload
from .viewer import CursorReadout, class_legend, fit_when_sized, segment_mode, set_interpolation

log = logging.getLogger(__name__)

LAYOUT_ID = "AttnSeg"
POLL_INTERVAL_S = 0.25
CLICK_POLL_INTERVAL_S = 0.02  # a click takes well under a second: its end is looked for more often
DOWNLOAD_FORMATS = {"nifti": ".nii.gz", "nrrd": ".nrrd"}


_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d{1,3})?")


def _number(value) -> float | None:
    """A field's value as a finite float: a number, or text that is only a decimal number; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str) and len(value) <= 32 and _NUMBER.fullmatch(value.strip()):
        number = float(value.strip())
    else:
        return None
    return number if math.isfinite(number) else None


def roi_from_fields(centre, size, geometry: Geometry) -> Box:
    """The page's ROI fields (centre and size along R, A, S in mm) as an engine :class:`Box` (LPS), checked
    against the image of ``geometry``: six finite numbers, positive sizes, the centre inside the image.
    Raises InputError with a one-line message naming the field to fix."""
    centre = centre if isinstance(centre, list) and len(centre) == 3 else [None] * 3
    size = size if isinstance(size, list) and len(size) == 3 else [None] * 3
    for what, values in (("centre", centre), ("size", size)):
        for axis, value in zip("RAS", values):
            if _number(value) is None:
                raise InputError(f"the ROI's {what} {axis} is not a number; type a number of millimetres")
    centre_ras = np.array([_number(v) for v in centre])
    size_mm = np.array([_number(v) for v in size])
    if np.any(size_mm <= 0):
        raise InputError("the ROI's sizes must be positive (mm); type the box's extent along R, A and S")
    centre_lps = centre_ras * [-1.0, -1.0, 1.0]
    index = np.linalg.inv(geometry.ijk_to_lps()) @ np.append(centre_lps, 1.0)
    if np.any(index[:3] < -0.5) or np.any(index[:3] > np.asarray(geometry.size) - 0.5):
        corners = geometry.corners_lps() * [-1.0, -1.0, 1.0]
        span = ", ".join(f"{axis} {a:.0f}..{b:.0f}" for axis, a, b in zip("RAS", corners.min(0), corners.max(0)))
        raise InputError(f"the ROI's centre lies outside the image ({span} mm); move the centre inside it")
    return Box.from_centre_size(centre_lps, size_mm)


def attnseg_layout() -> Layout:
    """Axial view large on the left; 3D, coronal and sagittal stacked on the right."""
    return Layout(LayoutDirection.Horizontal, [
        ViewLayoutDefinition.axial_view(),
        Layout(LayoutDirection.Vertical, [ViewLayoutDefinition.threed_view(), ViewLayoutDefinition.coronal_view(),
                                          ViewLayoutDefinition.sagittal_view()]),
    ])


def format_value(value: float) -> str:
    return f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.1e}"


_LABEL_MAP_NOTES: dict[tuple, str] = {}  # (path, mtime, size) -> label_map_note, shared by the sessions
_LABEL_MAP_NOTES_MAX = 1024


def label_map_note(path: Path) -> str:
    """Why the file at ``path`` is not an image to segment (a label map), or ``""``; each file
    (path, mtime, size) is read once."""
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _LABEL_MAP_NOTES:
        try:
            levels = label_map_levels(read_image(path).array)
        except ImageError:
            levels = None  # an unreadable file is reported when it is opened
        if len(_LABEL_MAP_NOTES) >= _LABEL_MAP_NOTES_MAX:
            _LABEL_MAP_NOTES.clear()
        _LABEL_MAP_NOTES[key] = (f"{text_name(path.name)} holds only {levels} integer values: a label map or segmentation, "
                                 "not an image to segment; open the scan it labels") if levels is not None else ""
    return _LABEL_MAP_NOTES[key]


def legend_gradient(stops) -> str:
    """A CSS ``linear-gradient`` from a :class:`~AttnSegLib.slicer_logic.MapLegend`'s colour stops."""
    parts = ", ".join(f"rgb({r}, {g}, {b}) {100 * position:.1f}%" for position, (r, g, b) in stops)
    return f"linear-gradient(to right, {parts})"


class AttnSegWebApp:
    """The scene, the views, the logic and the page of one session.

    ``data_dir``: the folder of volumes offered for opening; ``work_dir``: this session's own
    folder (uploads, exports), removed with the session.
    """

    def __init__(self, server: Server, data_dir: Path, work_dir: Path, upload_limit_bytes: int,
                 corrections_dir: Path | None = None):
        self.server = server
        self._corrections = CorrectionsFolder(corrections_dir) if corrections_dir is not None else None
        self.data_dir = Path(data_dir)
        self.work_dir = Path(work_dir)
        self.upload_limit_bytes = upload_limit_bytes
        server.enable_module(trame_slicer_module)

        self.slicer_app = SlicerApp()
        self.logic = SceneLogic(self.slicer_app.scene)
        register_rca_factories(self.slicer_app.view_manager, server, slice_view_ui_f=slice_view_overlay)
        self.layout_manager = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, server)
        self.layout_manager.register_layout(LAYOUT_ID, attnseg_layout())
        self.layout_manager.set_layout(LAYOUT_ID)
        self.segment_editor = SegmentEditorLogic(server, self.slicer_app)

        self.typed_state = TypedState(server.state, AttnSegState, namespace="attnseg")
        self.data = self.typed_state.data
        self.data.upload_limit_mb = round(upload_limit_bytes / 2**20)
        self.data.export.to_server = self._corrections is not None
        self.page = build_page(server, self, self.typed_state, self.layout_manager)
        self._clicks = ClickRefinement(self.logic)
        self._click_running = False
        for view in self.slicer_app.view_manager.get_slice_views():
            view.interactor().AddObserver("LeftButtonPressEvent", lambda *_, view=view: self._on_view_click(view))
        self.segment_editor.set_ui(self.page.segment_editor)
        # Corrections are drawn slice by slice: a 2D brush, not trame-slicer's default sphere.
        TypedState(server.state, PaintEffectState).data.use_sphere_brush = False
        self._segment_display = TypedState(server.state, SegmentEditorState).data.segment_display

        self._data_files: dict[str, Path] = {}  # file name offered from --data -> its path
        self._models: dict[str, Path] = {}  # package name offered -> its folder or .zip
        self._volumes: dict[str, object] = {}  # node name (unique in the scene) -> volume node
        self._opened_files: dict[tuple, str] = {}  # (path, mtime, size) -> node name, to open a file once
        self._task: SegmentationTask | None = None
        self._result = None  # SegmentationResult on screen
        self._package = None  # the ModelPackage that made it
        self._result_model = None  # the model name it was made with, as offered
        self._task_model = None  # the model name the running task was started with
        self._pending = None  # (action, argument) waiting for the user's answer
        self._kept: dict[str, object] = {}  # name -> corrected segmentation node kept beside a newer result
        self._reviewing = False  # the user opened the Review step since this result came: its map is shown
        self._regions_stale = False  # clicks changed the review map since the regions were described
        self.typed_state.bind_changes({
            self.typed_state.name.model.selected: self._on_model_selected,
            self.typed_state.name.model.inputs: self._check_inputs,
            self.typed_state.name.maps.selected: self._on_map_changed,
            self.typed_state.name.maps.opacity: self._on_map_changed,
            self.typed_state.name.review.threshold: self._on_threshold_changed,
            self.typed_state.name.viewer.interpolate: self._on_interpolate_changed,
            self.typed_state.name.viewer.segment_style: self._on_map_changed,
        })
        self._cursor = CursorReadout(server, self.scene, self.data.viewer, map_title)
        server.state.change(TAB_STATE)(self._on_tab_changed)
        server.state["trame__title"] = "AttnSeg"
        self._offer_volumes()
        self._offer_models()
        if self.data.volume.selected:  # the first volume offered (the shipped sample) is open from the start
            self.open_selected_volume()
            fit_when_sized(self.slicer_app.view_manager.get_views())

    @property
    def scene(self):
        return self.slicer_app.scene

    @property
    def editor(self):
        return self.slicer_app.segmentation_editor

    # -- volumes --------------------------------------------------------------------------------
    def _offer_volumes(self) -> None:
        files = offered_volumes(self.data_dir)
        notes = {f: label_map_note(f) for f in files}
        files = [f for f in files if not notes[f]]
        self.data.volume.notice = "Left out: " + "; ".join(n for n in notes.values() if n) if any(notes.values()) else ""
        self._data_files = {text_name(f.name): f for f in files}  # a name that is not UTF-8 as the page shows it
        self.data.volume.choices = [{"title": volume_title(f), "value": name} for name, f in self._data_files.items()]
        self.data.volume.selected = next(iter(self._data_files), None)
        if not files:
            self.data.volume.error = (f"no volumes ({', '.join(IMAGE_SUFFIXES)}) in {self.data_dir}; "
                                      "upload one, or start the server with --data FOLDER")

    def open_selected_volume(self) -> None:
        name = self.data.volume.selected
        path = self._data_files.get(name) if isinstance(name, str) else None
        if path is None:
            self.data.volume.error = "choose a volume from the list first"
            return
        self._open_volume_over_result(path)

    def upload_problem(self, name: str, size: int) -> str:
        """Checked before the browser sends a file: the reason to refuse it, or ``""``."""
        try:
            if not isinstance(size, int):
                raise UploadError(f"{name}: the browser sent no file size; choose the file again")
            check_upload(str(name), size, self.upload_limit_bytes)
        except UploadError as err:
            self.data.volume.error = str(err)
            return str(err)
        return ""

    def receive_upload(self, files: list[dict]) -> None:
        """Validate and open one uploaded volume (a dict as the trame client sends a ``File``)."""
        self.data.volume.error = ""
        if not files:
            return
        upload = files[0] if isinstance(files, list) else None
        try:
            if not isinstance(upload, dict):
                raise UploadError("the browser sent no file; choose the file again")
            if upload.get("error"):
                raise UploadError(f"{upload.get('name')}: the browser could not read the file ({upload['error']})")
            content = upload.get("content") or b""
            if isinstance(content, list) and all(isinstance(part, bytes) for part in content):
                content = b"".join(content)
            if not isinstance(content, bytes):
                raise UploadError(f"{upload.get('name')}: the browser sent no file content; choose the file again")
            path = save_upload(str(upload.get("name", "")), content, self.work_dir / "uploads",
                               self.upload_limit_bytes)
        except UploadError as err:
            log.info("refused upload: %s", err)
            self.data.volume.error = str(err)
            return
        self._open_volume_over_result(path)

    def _open_volume_over_result(self, path: Path) -> None:
        """Open ``path``; a result made from other volumes is the previous volume's state: it goes
        (after asking, when it was corrected)."""
        if self._result is not None and self._opened_node_name(path) not in self._result_input_names():
            if not self._may_replace_result("volume", path, f"Opening {text_name(path.name)}"):
                return
            if not self._open_volume(path):
                return
            self._clear_result()
            return
        self._open_volume(path)

    def _opened_node_name(self, path: Path) -> str | None:
        try:
            stat = path.stat()
        except OSError:
            return None
        return self._opened_files.get((str(path), stat.st_mtime_ns, stat.st_size))

    def _result_input_names(self) -> list[str]:
        return [n.GetName() for n in self._result.inputNodes if n is not None] if self._result else []

    def _open_volume(self, path: Path) -> bool:
        """Show the volume in ``path``, reading it once (a re-uploaded file with new content is re-read);
        False when it was refused.

        Single-file volumes only: a header naming a data file elsewhere is refused, and so is a label
        map (see :func:`label_map_note`). Errors name the file, not its folder on the server.
        """
        self.data.volume.error = ""
        try:
            stat = path.stat()
            key = (str(path), stat.st_mtime_ns, stat.st_size)
            name = self._opened_files.get(key)
            if name is None:
                check_data_file(path, allow_detached=False)
                note = label_map_note(path)
                if note:
                    raise ImageError(note)
                node = self.logic.loadVolume(path, name=case_name(path))
        except (ImageError, OSError) as err:
            self.data.volume.error = text_name(str(err).replace(str(path), path.name))
            return False
        if name is None:
            name = node.GetName()
            self._volumes[name] = node
            self._opened_files[key] = name
        self._show_volume(self._volumes[name])
        self.data.volume.loaded = name
        self.data.volume.opened = list(self._volumes)
        self._assign_inputs()
        return True

    def _show_volume(self, node) -> None:
        display = self.slicer_app.display_manager
        display.show_volume_in_slice_background(node)
        display.show_volume_in_slice_foreground(None)
        for view in self.slicer_app.view_manager.get_slice_views():
            view.set_visible_in_3d(True)
        display.reset_views()
        self._on_interpolate_changed()

    # -- models ---------------------------------------------------------------------------------
    def _offer_models(self) -> None:
        # Named as SceneLogic.availableModels names them: a folder's name, a .zip's stem.
        self._models = {p.stem if p.suffix == ".zip" else p.name: p for p in available_packages()}
        names = list(self._models)
        self.data.model.choices = [{"title": n, "value": n} for n in names]
        if not names:
            self.data.model.error = ("no model package installed: put one in ~/.attnseg/models or a folder "
                                     "named in $ATTNSEG_MODELS, then reload")
            return
        try:
            default = SceneLogic.defaultModelName()
        except PackageError:
            default = names[0]
        self.data.model.selected = default if default in names else names[0]

    def _selected_package(self):
        """The chosen package, loaded from where this session found it; PackageError for a name it
        did not offer (a client names models, never paths)."""
        name = self.data.model.selected
        path = self._models.get(name) if isinstance(name, str) else None
        if path is None:
            raise PackageError("choose a model from the list; that one is not offered by this server")
        try:
            return self.logic.loadModel(path)
        except PackageError as err:
            raise PackageError(str(err).replace(str(path), name)) from None

    def _on_model_selected(self, name: str | None) -> None:
        if self._result is not None and name != self._result_model:
            # The result on screen belongs to the previous model: it goes (after asking, when corrected).
            if not self._may_replace_result("model", name, f"Switching to {name}"):
                self.data.model.selected = self._result_model
                return
            self._clear_result()
        self.data.model.error = ""
        self.data.model.description = ""
        self.data.model.ready = False
        if not name:
            return
        try:
            package = self._selected_package()
        except PackageError as err:
            self.data.model.error = str(err)
            return
        card = package.card
        maps = ", ".join(card.maps) or "uncertainty only"
        parts = [card.description.strip(), f"{card.architecture} · classes: {', '.join(card.class_names[1:])} · "
                 f"inputs: {', '.join(card.modality_names)} · maps: {maps}"]
        if card.validation_dice is not None:
            parts.append(f"{card.validation_split} Dice {card.validation_dice:.3f}")
        self.data.model.description = " — ".join(p for p in parts if p)
        self._assign_inputs()

    def _assign_inputs(self) -> None:
        """One opened volume per modality of the model: the volume on screen for a single-modality
        model; for several, the user's choices where still valid, else the logic's name matching."""
        try:
            package = self._selected_package()
        except PackageError:
            return
        modalities = package.card.modality_names
        if len(modalities) == 1:
            volumes = [self.data.volume.loaded or None]
        else:
            chosen = {i["modality"]: i["volume"] for i in self._chosen_inputs()}
            guessed = [n.GetName() if n is not None else None for n in self.logic.guessInputVolumes(package)]
            volumes = [chosen.get(m, g) for m, g in zip(modalities, guessed)]
        self.data.model.inputs = [{"modality": m, "volume": v} for m, v in zip(modalities, volumes)]
        self._check_inputs(self.data.model.inputs)

    def _chosen_inputs(self) -> list[dict]:
        """The client's input choices that name a modality and a volume opened in this session."""
        inputs = self.data.model.inputs if isinstance(self.data.model.inputs, list) else []
        return [i for i in inputs if isinstance(i, dict) and isinstance(i.get("modality"), str)
                and isinstance(i.get("volume"), str) and i["volume"] in self._volumes]

    def _check_inputs(self, inputs) -> None:
        try:
            modalities = self._selected_package().card.modality_names
        except PackageError:
            return
        chosen = {i["modality"] for i in self._chosen_inputs()}
        missing = [m for m in modalities if m not in chosen]
        self.data.model.ready = not missing
        self.data.model.error = (f"open a volume for {', '.join(missing)} (one per input of the model)"
                                 if missing and self._volumes else "")

    def _input_volumes(self) -> list:
        """One opened volume node (or None) per modality of the model, as the client chose them."""
        chosen = {i["modality"]: self._volumes[i["volume"]] for i in self._chosen_inputs()}
        return [chosen.get(m) for m in self._selected_package().card.modality_names]

    # -- segmenting -----------------------------------------------------------------------------
    def segment(self) -> None:
        """Start the network on a worker thread; :meth:`_follow` reports progress and adds the result.
        Over a corrected result, the page asks first."""
        if self._task is not None:
            return
        if self._result is not None and not self._may_replace_result("segment", None, "Segmenting again"):
            return
        self._start_segmentation()

    def _start_segmentation(self) -> None:
        if self._task is not None:
            return
        segment = self.data.segment
        segment.error, segment.summary, segment.notices = "", "", []
        try:
            package = self._selected_package()
            volumes = self._input_volumes()
            job = self._prepare(volumes, package)
        except AttnSegError as err:
            segment.error = str(err)
            return
        self._task = SegmentationTask(job).start()
        self._task_model = self.data.model.selected
        segment.running, segment.cancelling, segment.percent, segment.stage, segment.eta = True, False, 0, "starting", ""
        create_task(self._follow(self._task))

    def _prepare(self, volumes: list, package):
        """The job for ``volumes``; with the ROI box ticked, inside it (given to the logic as a markups ROI
        node, removed again once the job holds its box)."""
        segment = self.data.segment
        if segment.roi_enabled is not True or not volumes or volumes[0] is None:
            return self.logic.prepare(volumes, package)
        box = roi_from_fields(segment.roi_centre, segment.roi_size, volumeGeometry(volumes[0]))
        roi = roiNodeFromBox(box, self.scene, "AttnSeg ROI")
        try:
            return self.logic.prepare(volumes, package, roiNode=roi)
        finally:
            self.scene.RemoveNode(roi)

    def cancel_segmentation(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self.data.segment.cancelling = True

    async def _follow(self, task: SegmentationTask) -> None:
        segment = self.data.segment
        while not task.done():
            fraction, eta, stage = task.progress
            with self.server.state:
                segment.percent = round(100 * fraction, 1)
                segment.stage = stage
                segment.eta = f"about {eta:.0f} s left" if eta is not None and fraction < 1 else ""
            # until the job reports progress, looked at as often as a click: its first stage is shown even
            # when the whole job takes less than one POLL_INTERVAL_S (a crop on an idle machine)
            await asyncio.sleep(CLICK_POLL_INTERVAL_S if fraction == 0 else POLL_INTERVAL_S)
        with self.server.state:
            self._task = None
            segment.running, segment.cancelling = False, False
            try:
                result = self.logic.addResult(task.job, task.result())
            except Cancelled:
                segment.error = "Segmentation cancelled; nothing was added."
                return
            except Exception as err:  # shown in the page; the session keeps running
                log.exception("segmentation failed")
                segment.error = f"Segmentation failed: {err}"
                return
            self._show_result(result, task.job.package, self._task_model)
        create_task(self._prepare_clicks(result))

    async def _prepare_clicks(self, result) -> None:
        """Once a result is on the page, its click session gets ready (see
        :meth:`~AttnSegLib.slicer_refine.SceneRefinement.load` and ``warmUp``: the refiner loaded and the
        labels read on the server loop, the refiner's first runs done on a worker thread), so that the
        first click costs what the others cost, even one that comes as soon as the Refine step opens."""
        await asyncio.sleep(POLL_INTERVAL_S)  # the page and the views get the result first
        if self._result is not result:
            return
        try:
            session = self._clicks.session(result.segmentationNode, self._package.card.class_names)
            session.load()
        except AttnSegError as err:
            with self.server.state:
                self.data.refine.error = str(err)
            return
        await asyncio.to_thread(session.warmUp)

    # -- replacing a result ---------------------------------------------------------------------
    def _may_replace_result(self, action: str, argument, doing: str) -> bool:
        """True when the result on screen may be replaced now (nothing corrected in it); else the page
        asks (``confirm``) and :meth:`answer` does ``action`` with ``argument`` if the user agrees."""
        try:
            changed = self.logic.correctedVoxelCount(self._result.segmentationNode)
            what = f"{changed} voxel{'s' if changed != 1 else ''} you corrected"
        except AttnSegError:
            changed, what = 1, "segments you added or renamed"
        if not changed:
            return True
        self._pending = (action, argument)
        self.data.confirm.message = (f"{doing} replaces the segmentation on screen and the {what} in it. "
                                     "Keep the corrected segmentation beside the new result, or discard it?")
        self.data.confirm.action = action
        return False

    def answer(self, choice: str) -> None:
        """The user's answer to ``confirm``: ``keep`` (the corrected segmentation stays, hidden, and can
        still be downloaded), ``discard``, or anything else to cancel."""
        action, argument = self._pending or ("", None)
        self._pending = None
        self.data.confirm.action, self.data.confirm.message = "", ""
        if choice not in ("keep", "discard") or not action or self._result is None:
            return
        if choice == "keep":
            self._keep_result()
        if action == "segment":
            self._start_segmentation()
        elif action == "model":
            self._clear_result()
            self.data.model.selected = argument
        elif action == "volume" and self._open_volume(argument):
            self._clear_result()

    def _keep_result(self) -> None:
        """Set the corrected segmentation on screen aside, renamed: when its result is replaced it is
        hidden, not removed (its maps go), and the export step still downloads it."""
        node = self._result.segmentationNode
        node.SetName(self.scene.GenerateUniqueName(f"{node.GetName()} (corrected, kept)"))
        self._kept[node.GetName()] = node
        self.data.export.kept = list(self._kept)

    def _clear_result(self) -> None:
        """The result on screen goes with its maps; every panel that described it is emptied."""
        if self._result is not None:
            self._clicks.forget(self._result.segmentationNode)
            self._remove_result(self._result)
        self._result, self._package, self._result_model = None, None, None
        self.editor.deactivate_effect()
        self.logic.showMap(None)
        data = self.data
        data.has_result = False
        data.segment.summary, data.segment.notices, data.segment.error = "", [], ""
        data.maps.choices, data.maps.selected = [], None
        data.maps.meaning = data.maps.how_to_read = data.maps.legend_gradient = data.maps.detection = ""
        data.maps.unit = data.maps.information = ""
        data.maps.legend_low = data.maps.legend_high = ""
        data.review.count, data.review.description = 0, ""
        data.review.rows, data.review.current, data.viewer.legend = [], -1, []
        data.refine.choices, data.refine.selected, data.refine.clicks = [], None, []
        data.refine.message, data.refine.error = "", ""
        data.export.message, data.export.error = "", ""
        self.server.state[TAB_STATE] = "segment"

    def _show_result(self, result, package, model_name: str) -> None:
        previous, self._result, self._package = self._result, result, package
        self._reviewing = self.server.state[TAB_STATE] == "review"
        self._result_model = model_name
        self.editor.deactivate_effect()
        self.editor.set_active_segmentation(result.segmentationNode, result.inputNodes[0])
        self.editor.set_surface_representation_enabled(True)
        if previous is not None:
            self._clicks.forget(previous.segmentationNode)
            self._remove_result(previous)
        volumes = volumes_text(result.classVolumesMl)
        total = sum(result.timings.values())
        self.data.segment.summary = (f"{volumes} · {total:.1f} s on {result.provenance.get('device', '?')}")
        self.data.segment.notices = list(result.notices)
        self.data.maps.choices = [{"title": "None", "value": ""}] + [
            {"title": map_title(name), "value": name} for name in result.mapNodes]
        self.data.maps.selected = result.reviewMapName
        self.data.viewer.legend = class_legend(result.segmentationNode)
        self._on_interpolate_changed()
        self._on_map_changed()
        self._describe_regions()
        self.data.export.message, self.data.export.error = "", ""
        refine = self.data.refine
        refine.choices = click_choices(result.classes)
        refine.selected = refine.choices[0]["value"]
        refine.clicks, refine.message, refine.error = clicks_text(result.segmentationNode), "", ""
        self.data.has_result = True

    def _remove_result(self, result) -> None:
        """A new segmentation replaces the one on screen: its maps and model output go with it. A kept
        segmentation (:meth:`_keep_result`) is hidden instead, and keeps its model output."""
        removed = list(result.mapNodes.values())
        if result.segmentationNode in self._kept.values():
            result.segmentationNode.GetDisplayNode().SetVisibility(False)
        else:
            removed += [result.segmentationNode, result.modelLabelNode]
        for node in removed:
            if node is not None and self.scene.GetNodeByID(node.GetID()) is not None:
                self.scene.RemoveNode(node)

    # -- maps -----------------------------------------------------------------------------------
    def _on_map_changed(self, *_) -> None:
        if self._result is None:
            return
        maps = self.data.maps
        node = self._result.mapNodes.get(maps.selected) if isinstance(maps.selected, str) and self._reviewing else None
        opacity = maps.opacity if isinstance(maps.opacity, (int, float)) and 0 <= maps.opacity <= 1 else 0.5
        self.logic.showMap(node, opacity=float(opacity), backgroundNode=self._result.inputNodes[0])
        for view in self.slicer_app.view_manager.get_slice_views():
            view.schedule_render()  # the views redraw on their own for a new layer, not for a new opacity
        # Over a map the segmentation is drawn as its outline, so the map's colours stay readable.
        mode = segment_mode(self.data.viewer.segment_style, node is not None)
        self._segment_display.opacity_mode = mode  # the editor's Rendering panel shows it
        if self.editor.active_segmentation_display:  # a new segmentation's display starts filled
            self.editor.active_segmentation_display.set_opacity_mode(mode)
        if node is None:
            maps.meaning = maps.how_to_read = maps.legend_gradient = maps.legend_low = maps.legend_high = ""
            maps.detection = maps.unit = maps.information = ""
            return
        legend = self.logic.mapLegend(node)
        maps.meaning = legend.meaning
        maps.how_to_read = self._package.card.map_reading(legend.name)
        maps.detection = detection_note(self._package.card, legend.name)
        maps.unit, maps.information = legend.unit, legend.information
        maps.legend_gradient = legend_gradient(legend.stops)
        maps.legend_low, maps.legend_high = format_value(legend.first), format_value(legend.last)

    # -- review ---------------------------------------------------------------------------------
    def _threshold(self) -> float:
        value = self.data.review.threshold
        return float(value) if isinstance(value, (int, float)) and 0 <= value <= 1 else 0.5

    def _review_map_title(self) -> str:
        return map_title(self._result.reviewMapName).lower()

    def _on_threshold_changed(self, *_) -> None:
        if self._result is not None and self._result.segmentationNode is not None:
            self._describe_regions()

    def _describe_regions(self) -> None:
        """The true count of regions at the chosen threshold, and the rule that made them."""
        threshold = self._threshold()
        regions = self.logic.doubtfulRegions(self._result.segmentationNode, threshold)
        self._regions_stale = False
        count = len(regions)
        review = self.data.review
        review.count, review.current = count, -1
        review.rows = region_rows(sorted_regions(regions, review.sort_by, review.sort_descending))
        rule = doubtful_rule(self._result.reviewMapName, threshold)
        review.description = (f"{count} doubtful region{'s' if count != 1 else ''} ({rule}); the most doubtful "
                              "comes first." if count else f"No region ({rule}).")

    def sort_regions(self, key: str) -> None:
        """A click on the region table's header ``key``: sort by it (again: the other way)."""
        if self._result is None or self._result.segmentationNode is None:
            return
        review = self.data.review
        review.sort_by, review.sort_descending = next_sort(review.sort_by, review.sort_descending, key)
        regions = self.logic.doubtfulRegions(self._result.segmentationNode, self._threshold())
        review.rows = region_rows(sorted_regions(regions, review.sort_by, review.sort_descending))

    def go_to_region(self, index) -> None:
        """A click on the region table's row of region ``index`` (0 = the most doubtful)."""
        if self._result is None or self._result.segmentationNode is None or not isinstance(index, int) \
                or isinstance(index, bool):
            return
        self._go_to_region(self.logic.goToDoubtfulRegion(self._result.segmentationNode, self._threshold(), index))

    def _on_interpolate_changed(self, *_) -> None:
        set_interpolation(self.scene, self.data.viewer.interpolate is True)
        for view in self.slicer_app.view_manager.get_slice_views():
            view.schedule_render()

    def next_region(self) -> None:
        self._go_to_region(self.logic.nextDoubtfulRegion(self._result.segmentationNode, self._threshold()))

    def previous_region(self) -> None:
        self._go_to_region(self.logic.previousDoubtfulRegion(self._result.segmentationNode, self._threshold()))

    def _go_to_region(self, stop) -> None:
        review = self.data.review
        if stop is None:
            self._describe_regions()
            return
        self.logic.centerSliceViews(stop.markerRAS, self._result.inputNodes[0])
        self.logic.markPoint(stop.markerRAS)
        region = stop.region
        review.count, review.current = stop.count, stop.index
        name = self._review_map_title()
        review.description = (f"Region {stop.index + 1} of {stop.count}: {region.volume_ml:.3f} ml, mean {name} "
                              f"{region.mean_value:.2f} (peak {region.peak_value:.2f}); the cross marks it.")

    # -- correcting -----------------------------------------------------------------------------
    def _on_tab_changed(self, **_) -> None:
        """The map overlay appears when the user first opens the Review step of a result; the regions are
        described again there when clicks changed the map; opening the Refine step loads the click
        session when :meth:`_prepare_clicks` could not, or a failed click made it read the scene anew."""
        tab = self.server.state[TAB_STATE]
        if tab == "review" and not self._reviewing:
            self._reviewing = True
            self._on_map_changed()
        if tab == "review" and self._regions_stale and self._result is not None:
            self._describe_regions()
        if tab == "refine" and self._result is not None:
            try:
                self._clicks.session(self._result.segmentationNode, self._package.card.class_names).load()
            except AttnSegError as err:
                self.data.refine.error = str(err)

    def stop_editing(self) -> None:
        """Leave the paint/erase tools, so the mouse in a view browses again."""
        self.editor.deactivate_effect()

    # -- refining with clicks -------------------------------------------------------------------
    def _on_view_click(self, view) -> None:
        """A left button press in a slice view: in the Refine step, a click of the chosen class there."""
        if self.server.state[TAB_STATE] != "refine" or self._result is None:
            return
        with self.server.state:
            self._add_click(view_point_lps(view))

    def _add_click(self, position_lps) -> None:
        """Check the click (see :meth:`ClickRefinement.prepare`) and refine it on a worker thread; one
        click at a time."""
        refine = self.data.refine
        if self._click_running:
            refine.error = "wait: the previous click is still being refined"
            return
        refine.error = ""
        arrived = time.perf_counter()
        try:
            job = self._clicks.prepare(self._result.segmentationNode, refine.selected, position_lps,
                                       self._package.card.class_names)
        except AttnSegError as err:
            refine.error = str(err)
            return
        self._click_running = refine.running = True
        create_task(self._follow_click(job.start(), arrived))

    async def _follow_click(self, job, arrived: float) -> None:
        """Wait for the click's worker thread, then write its result into the scene (``arrived``: when
        the click came, for the time the page shows)."""
        while not job.done():
            await asyncio.sleep(CLICK_POLL_INTERVAL_S)
        try:
            refined, undo = job.outcome()
        except Exception as err:  # shown in the page; the session keeps running
            log.exception("refinement failed")
            self._clicks.discard(job)
            with self.server.state:
                self._click_running = self.data.refine.running = False
                self.data.refine.error = f"Refinement failed: {err}"
            return
        with self.server.state:
            self._click_running = self.data.refine.running = False
            if self._result is None or self._result.segmentationNode is not job.segmentationNode:
                return  # the result was replaced meanwhile: the click belongs to no result on screen
            self._clicks.apply(job, refined, undo)
            self._after_clicks(f"{int(refined.changed.sum())} voxels updated in "
                               f"{time.perf_counter() - arrived:.2f} s (the refinement itself "
                               f"{refined.seconds:.2f} s, {job.refiner.method})")

    def undo_click(self) -> None:
        """Put back what the last click changed."""
        refine = self.data.refine
        if self._result is None or self._click_running:
            return
        try:
            self._clicks.undo(self._result.segmentationNode)
        except AttnSegError as err:
            refine.error = str(err)
            return
        refine.error = ""
        self._after_clicks("The last click was undone.")

    def _after_clicks(self, message: str) -> None:
        node = self._result.segmentationNode
        self.data.refine.clicks = clicks_text(node)
        self.data.refine.message = message
        # the regions are described again when the Review step shows them: on a whole head that takes
        # longer than the click
        self._regions_stale = self.server.state[TAB_STATE] != "review"
        if not self._regions_stale:
            self._describe_regions()
        for view in self.slicer_app.view_manager.get_views():
            view.schedule_render()

    # -- export ---------------------------------------------------------------------------------
    def _base_name(self) -> str:
        return case_name(self._result.inputNodes[0].GetName()) if self._result else "segmentation"

    def download_segmentation(self, fmt: str, kept: str = "") -> dict | None:
        """The corrected segmentation (class values on the input grid) as NIfTI or NRRD bytes: the one
        on screen, or the ``kept`` one of that name."""
        export = self.data.export
        export.error = export.message = ""
        suffix = DOWNLOAD_FORMATS.get(fmt) if isinstance(fmt, str) else None
        if suffix is None:
            export.error = f"unknown format; choose one of {', '.join(DOWNLOAD_FORMATS)}"
            return None
        node = self._kept.get(kept) if isinstance(kept, str) and kept else (
            self._result.segmentationNode if self._result else None)
        if node is None:
            export.error = "segment a volume first" if not kept else "choose a kept segmentation from the list"
            return None
        try:
            labels = self.logic.correctedLabels(node)
        except AttnSegError as err:
            export.error = str(err)
            return None
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", node.GetName()).strip("_") if kept else self._base_name()
        name = f"{base}_segmentation{suffix}"
        with tempfile.TemporaryDirectory(dir=self.work_dir) as folder:
            content = write_image(labels, Path(folder) / name).read_bytes()
        export.message = f"{name}: {len(content) / 1024:.0f} KiB"
        return {"name": name, "content": self.server.protocol.addAttachment(content)}

    def download_training_case(self) -> dict | None:
        """The corrected case as ``training/`` reads it (see ``SceneLogic.exportCorrection``), zipped."""
        export = self.data.export
        export.error = export.message = ""
        if self._result is None:
            export.error = "segment a volume first"
            return None
        if self._corrections is not None:  # saved on the server, nothing to download
            try:
                name = self._corrections.save(self.logic, self._result.segmentationNode, self._base_name())
            except (AttnSegError, OSError) as err:
                export.error = str(err).replace(str(self._corrections.root), "the corrections folder")
                return None
            export.message = f"Saved as {name} in the server's corrections folder, ready for training/."
            return None
        cases = self.work_dir / "cases"
        try:
            folder = self.logic.exportCorrection(self._result.segmentationNode, cases, overwrite=True)
        except (AttnSegError, OSError) as err:
            export.error = str(err)
            return None
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:  # members are gzip-compressed already
            for member in sorted(folder.rglob("*")):
                archive.write(member, Path(folder.name) / member.relative_to(folder))
        shutil.rmtree(folder, ignore_errors=True)
        name = f"{folder.name}_training_case.zip"
        export.message = f"{name}: unzip into a folder that training/ reads with layout 'corrected'"
        return {"name": name, "content": self.server.protocol.addAttachment(buffer.getvalue())}
