"""AttnSeg: attention-based 3D segmentation that shows where the network looked and where it is unsure.

The module follows Slicer's scripted-module template and supports Slicer 5.6 to 5.12 (Python 3.9 and
3.12). The widget only draws and calls the logic; all work is done by
:class:`AttnSegLib.slicer_logic.SceneLogic`, which has no Qt and is tested on slicer-core. The network
runs in a worker process started with Slicer's own Python (``PythonSlicer``) and kept alive with its
model between runs; the widget polls it from a QTimer, so Slicer stays responsive, Cancel ends a run
within a second, and a crash or out-of-memory kill of the worker leaves Slicer and the scene intact.
"""
import contextlib
import logging
import os
import pathlib
import shutil
import unittest
from typing import Annotated

import qt
import slicer
from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from AttnSegLib.dependencies import PIP_REQUIREMENTS, TORCH, missing_requirements
from AttnSegLib.errors import AttnSegError

MAX_MODALITIES = 4
DEVICES = ["auto", "cpu", "cuda", "mps"]
POLL_INTERVAL_MS = 200
LIGHTBOX_EDITING_SLICER = (5, 10)  # the first Slicer whose Segment Editor effects work in light box views


@contextlib.contextmanager
def _showErrors(message: str, waitCursor: bool = False):
    """Like ``slicer.util.tryWithErrorDisplay`` without re-raising: an error is logged and shown, and the
    caller (possibly building the panel) carries on."""
    if waitCursor:
        slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
    try:
        try:
            yield
        finally:
            if waitCursor:
                slicer.app.restoreOverrideCursor()
    except Exception as error:
        logging.exception(message)
        slicer.util.errorDisplay(f"{message}\n\n{error}")


def _parameterWidgets(ui) -> dict:
    """Parameter name -> widget of the panel's widgets that name one in their ``SlicerParameterName``
    property (the widgets ``connectGui`` would connect)."""
    return {widget.property("SlicerParameterName"): widget for widget in vars(ui).values()
            if widget.property("SlicerParameterName")}


def _resourcePath(relativePath: str) -> str:
    """A file under Resources/: beside AttnSeg.py once installed, one folder up in the source tree."""
    here = os.path.dirname(os.path.abspath(__file__))
    for root in (here, os.path.dirname(here)):
        candidate = os.path.join(root, "Resources", relativePath)
        if os.path.exists(candidate):
            return candidate
    raise FileNotFoundError(f"AttnSeg resource {relativePath} is missing; reinstall the extension")


#
# AttnSeg
#


class AttnSeg(ScriptedLoadableModule):
    """Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("AttnSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations"]  # its Segment Editor widget is in the panel
        self.parent.contributors = ["AttnSeg contributors"]
        self.parent.helpText = _("""
Segments 3D images with attention-based networks and shows, next to the segmentation, the class
probabilities, the network's uncertainty and the model's own attention, confidence or difficulty maps.
Step through the most doubtful regions, correct them with clicks (each point placed adds or removes a
class around it at once, with undo) or in the Segment Editor (optionally only where the network was
unsure), and save the corrected case, with its clicks, for retraining.
""")
        self.parent.acknowledgementText = _("""
Networks follow published attention-based segmentation designs; see each model's card for its paper
and the data it was trained on. The sample is case 001 of the Medical Segmentation Decathlon
hippocampus task (CC-BY-SA 4.0, Simpson et al. 2019, Vanderbilt University Medical Center).
""")
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """The shipped hippocampus case in the Sample Data module."""
    import SampleData

    image = _resourcePath("SampleData/hippocampus_001_image.nii.gz")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="AttnSeg",
        sampleName="AttnSegHippocampus",
        thumbnailFileName=_resourcePath("Icons/AttnSeg.png"),
        uris=qt.QUrl.fromLocalFile(image).toString(),
        fileNames="hippocampus_001_image.nii.gz",
        nodeNames="hippocampus_001_image",
        loadFileType="VolumeFile",
    )


#
# AttnSegParameterNode
#


@parameterNodeWrapper
class AttnSegParameterNode:
    """The panel's state, saved with the scene.

    inputVolume0..3 - one volume per modality the model expects, in the card's order.
    modelName - the model package (bound by hand: the list of models is only known at run time).
    device - where the network runs.
    roi - the markups ROI to segment inside (None: the whole volume, localised by the engine when the
        model's card says how and the volume is much larger than its training field of view).
    segmentation - the AttnSeg segmentation under review.
    mapName - the map shown over the image; mapOpacity - its opacity.
    reviewThreshold - voxels whose review map is at or above it are doubtful (review and editing).
    editDoubtfulOnly - restrict Segment Editor effects to doubtful voxels and the 2 mm around them.
    correctionDirectory - where corrected cases are saved for training.
    """

    inputVolume0: vtkMRMLScalarVolumeNode
    inputVolume1: vtkMRMLScalarVolumeNode
    inputVolume2: vtkMRMLScalarVolumeNode
    inputVolume3: vtkMRMLScalarVolumeNode
    modelName: str = ""
    device: Annotated[str, Choice(DEVICES)] = "auto"
    roi: vtkMRMLMarkupsROINode
    segmentation: vtkMRMLSegmentationNode
    mapName: str = ""
    mapOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    reviewThreshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    editDoubtfulOnly: bool = False
    correctionDirectory: pathlib.Path = pathlib.Path.home() / "AttnSegCorrections"


#
# AttnSegWidget
#


class AttnSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._task = None
        self._adding = None  # (task, AttnSegLogic.addResultSteps generator) while its nodes are added
        self._timer = None
        self._modalityCount = 0
        self._engineReady = not missing_requirements()  # False until torch and MONAI are installed

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(_resourcePath("UI/AttnSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.inputSelectors = [getattr(self.ui, f"inputVolumeSelector{i}") for i in range(MAX_MODALITIES)]
        self.inputLabels = [getattr(self.ui, f"inputVolumeLabel{i}") for i in range(MAX_MODALITIES)]

        self.logic = AttnSegLogic()
        # The Segment Editor inside the panel, on the Segment Editor module's own parameter node (so
        # "Edit only doubtful voxels" applies to it), set before the scene as the Segment Editor module does.
        self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(self.logic.segmentEditorNode())
        self.ui.segmentEditorWidget.setMRMLScene(slicer.mrmlScene)
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPollTask)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.app.applicationLogic().GetInteractionNode(),
                         slicer.vtkMRMLInteractionNode.InteractionModeChangedEvent, self.onInteractionModeChanged)

        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.localiseButton.connect("clicked(bool)", self.onLocaliseButton)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged)
        self.ui.mapComboBox.connect("currentIndexChanged(int)", self.onMapChanged)
        self.ui.opacitySlider.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.previousRegionButton.connect("clicked(bool)", lambda: self.onStepRegion(-1))
        self.ui.nextRegionButton.connect("clicked(bool)", lambda: self.onStepRegion(+1))
        self.ui.editDoubtfulOnlyCheckBox.connect("toggled(bool)", self.onEditDoubtfulOnly)
        self.ui.reviewThresholdSlider.connect("valueChanged(double)", self.onThresholdChanged)
        self.ui.refineClassComboBox.connect("currentIndexChanged(int)", self.onRefineClassChanged)
        self.ui.addPointButton.connect("toggled(bool)", lambda on: self.onPlacePoints(False, on))
        self.ui.removePointButton.connect("toggled(bool)", lambda on: self.onPlacePoints(True, on))
        self.ui.undoClickButton.connect("clicked(bool)", self.onUndoClick)
        self.ui.saveCorrectionButton.connect("clicked(bool)", self.onSaveCorrection)
        for selector in self.inputSelectors:
            selector.connect("currentNodeChanged(vtkMRMLNode*)", self._updateButtons)

        self.ui.progressBar.hide()
        self.initializeParameterNode()
        self._populateModels()

    def cleanup(self) -> None:
        self._adding = None
        if self._timer is not None:
            self._timer.stop()
        if self.logic is not None:
            self.logic.shutdownWorker()  # cancels a running job
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self._connectEditor()
        editor = self.ui.segmentEditorWidget
        # Before Slicer 5.10 effects do not work in light box slice views: the Segment Editor module resets
        # them on enter (Modules/Scripted/SegmentEditor/SegmentEditor.py at v5.6.2 and v5.8.1); from v5.10.0
        # turnOffLightboxes() only warns that it is no longer needed.
        if (slicer.app.majorVersion, slicer.app.minorVersion) < LIGHTBOX_EDITING_SLICER and editor.turnOffLightboxes():
            slicer.util.warningDisplay(_("The Segment Editor in this panel does not work in light box slice views "
                                         "in this Slicer version; the views were reset."), windowTitle=_("AttnSeg"))
        editor.installKeyboardShortcuts()
        editor.setupViewObservations()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
        # As the Segment Editor module leaves: no effect stays active in the views, no shortcut stays taken.
        self.ui.segmentEditorWidget.setActiveEffect(None)
        self.ui.segmentEditorWidget.uninstallKeyboardShortcuts()
        self.ui.segmentEditorWidget.removeViewObservations()

    def onSceneStartClose(self, caller, event) -> None:
        self._adding = None  # nodes of a result are not added to the next scene
        self.ui.refineStatusLabel.text = ""
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Not connectGui: before Slicer 5.10 it returns no tag (Slicer commit b5a65a49a0, in v5.10.0), so
            # disconnectGui could never undo it and every enter would add another set of connections.
            self._parameterNodeGuiTag = self._parameterNode.connectParametersToGui(_parameterWidgets(self.ui))
            if self._parameterNode.modelName:
                self.ui.modelComboBox.setCurrentText(self._parameterNode.modelName)
            self._populateMaps()
            self._populateRefineClasses()
        self._updateButtons()

    # -- dependencies and models ----------------------------------------------------------------
    def _ensureDependencies(self) -> bool:
        """Install torch (PyTorch extension) and the pip requirements, after asking. True when ready."""
        missing = missing_requirements()
        if not missing:
            return True
        names = ", ".join(r.spec for r in missing)
        if not slicer.util.confirmOkCancelDisplay(
                _("AttnSeg needs {names}. Download and install them now (a few minutes, several GB for PyTorch)?")
                .format(names=names), windowTitle=_("AttnSeg dependencies")):
            return False
        with _showErrors(_("Installing the dependencies failed."), waitCursor=True):
            if TORCH in missing:
                try:
                    import PyTorchUtils
                except ModuleNotFoundError:
                    slicer.util.errorDisplay(_("Install the PyTorch extension from the Extensions Manager, "
                                               "restart Slicer, and try again."))
                    return False
                torchRequirement = TORCH.spec[len(TORCH.module):]  # e.g. ">=2.2"
                if PyTorchUtils.PyTorchUtilsLogic().installTorch(
                        askConfirmation=False, torchVersionRequirement=torchRequirement) is None:
                    return False
            pipMissing = [r.spec for r in missing if r in PIP_REQUIREMENTS]
            if pipMissing:
                slicer.util.pip_install(pipMissing)
        self._engineReady = not missing_requirements()
        return self._engineReady

    def _populateModels(self) -> None:
        if not self._engineReady:
            self.ui.modelCardLabel.text = _("Click Segment to install PyTorch and MONAI (you will be asked first).")
            return
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for name in self.logic.sceneLogic.availableModels():
            combo.addItem(name)
        wanted = self._parameterNode.modelName if self._parameterNode else ""
        if not wanted:
            try:
                wanted = self.logic.sceneLogic.defaultModelName()
            except AttnSegError:  # no default configured: the first installed model is selected
                wanted = ""
        if wanted:
            combo.setCurrentText(wanted)
        combo.blockSignals(wasBlocked)
        self.onModelChanged()

    def onModelChanged(self, index=None) -> None:
        name = self.ui.modelComboBox.currentText
        if not name or self._parameterNode is None:
            return
        self._parameterNode.modelName = name
        self._modalityCount = 0
        with _showErrors(_("The model package cannot be used."), waitCursor=True):
            package = self.logic.sceneLogic.loadModel(name)
            self.ui.modelCardLabel.text = _modelCardHtml(package.summary())
            modalities = package.modalities
            if len(modalities) > MAX_MODALITIES:
                raise ValueError(f"{name} takes {len(modalities)} modalities; this panel has room for "
                                 f"{MAX_MODALITIES} (segment with the attnseg command line instead)")
            self._modalityCount = len(modalities)
            guesses = self.logic.sceneLogic.guessInputVolumes(package)
            for i, (label, selector) in enumerate(zip(self.inputLabels, self.inputSelectors)):
                used = i < len(modalities)
                label.visible = selector.visible = used
                if used:
                    modality = modalities[i]
                    label.text = f"{modality['name']}:"
                    selector.toolTip = modality.get("contrast", modality["name"])
                    if selector.currentNode() is None and guesses[i] is not None:
                        selector.setCurrentNode(guesses[i])
        self._updateButtons()

    # -- segmenting -------------------------------------------------------------------------------
    def _inputVolumes(self) -> list:
        return [selector.currentNode() for selector in self.inputSelectors[:self._modalityCount]]

    def _updateButtons(self, *args) -> None:
        running, adding = self._task is not None, self._adding is not None
        volumes = self._inputVolumes()
        self.ui.segmentButton.text = _("Cancel") if running else _("Segment")
        self.ui.segmentButton.enabled = not adding and (
            running or (bool(volumes) and all(volumes)) or not self._engineReady)
        self.ui.localiseButton.enabled = not running and not adding and self._localisable()
        hasSegmentation = self._attnsegSegmentation() is not None
        for button in (self.ui.previousRegionButton, self.ui.nextRegionButton, self.ui.saveCorrectionButton,
                       self.ui.segmentEditorWidget, self.ui.editDoubtfulOnlyCheckBox, self.ui.refineClassComboBox,
                       self.ui.addPointButton, self.ui.removePointButton):
            button.enabled = hasSegmentation and not running and not adding
        refinement = self._clickRefinement()
        self.ui.undoClickButton.enabled = (refinement is not None and refinement.undoSteps > 0 and not running
                                           and not adding)

    def _localisable(self) -> bool:
        """The model's card says how to localise and the first input is much larger than its training field
        of view."""
        volumes = self._inputVolumes()
        if not (self._engineReady and self._parameterNode and self._parameterNode.modelName and volumes
                and volumes[0] is not None):
            return False
        try:
            return self.logic.sceneLogic.needsLocalisation(volumes[0], self._parameterNode.modelName)
        except AttnSegError:  # an unusable package: onModelChanged has shown why
            return False

    def onLocaliseButton(self) -> None:
        with _showErrors(_("Localisation failed."), waitCursor=True):
            rois = self.logic.sceneLogic.localisationROIs(self._inputVolumes()[0], self._parameterNode.modelName)
            self.ui.statusLabel.text = _(
                "Placed {names}. Segment with no region to segment them all (localised again); to segment "
                "inside one box only, move it if needed and choose it under Region: it keeps the head's size "
                "normalisation (a box drawn by hand is cut at the scan's own size).").format(
                names=", ".join(node.GetName() for node in rois))

    def onSegmentButton(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self.ui.statusLabel.text = _("Cancelling...")
            return
        if not self._ensureDependencies():
            return
        if self.ui.modelComboBox.count == 0:
            self._populateModels()
            return
        with _showErrors(_("Segmentation could not start."), waitCursor=True):
            parameters = self._parameterNode
            job = self.logic.sceneLogic.prepare(self._inputVolumes(), parameters.modelName, parameters.device,
                                                inProcess=False, roiNode=parameters.roi)
            self._task = self.logic.startTask(job)
            self.ui.progressBar.value = 0
            self.ui.progressBar.show()
            self.ui.statusLabel.text = _("Starting the segmentation worker...")
            self._timer.start()
        self._updateButtons()

    def onPollTask(self) -> None:
        """Runs on the UI thread every POLL_INTERVAL_MS while the network works."""
        from AttnSegLib.slicer_logic import Cancelled

        task = self._task
        fraction, eta, stage = task.progress
        self.ui.progressBar.value = int(round(fraction * 1000))
        self.ui.progressBar.format = f"{fraction:.0%}" + (f"  (about {eta:.0f} s left)" if eta else "")
        if not task.done():
            if not task.cancelRequested and task.device:
                self.ui.statusLabel.text = _("{stage} on {device}...").format(stage=stage.capitalize(),
                                                                             device=task.device)
            return
        self._timer.stop()
        self._task = None
        self.ui.progressBar.hide()
        try:
            self._adding = (task, self.logic.sceneLogic.addResultSteps(task.job, task.result()))
        except Cancelled:
            task.close()
            self.ui.statusLabel.text = _("Cancelled; nothing was added to the scene.")
        except Exception as error:
            task.close()
            self._showFailure(error)
        else:
            qt.QTimer.singleShot(0, self.onAddNextNode)
        self._updateButtons()

    def onAddNextNode(self) -> None:
        """Adds one node of the result, then lets Qt run before the next (a whole-head result is several
        volumes: added at once they would hold the main thread for seconds)."""
        if self._adding is None:  # the scene was closed meanwhile
            return
        task, steps = self._adding
        try:
            added = next(steps)
        except StopIteration as finished:
            self._adding = None
            task.close()
            result = finished.value
            seconds = sum(result.timings.values())
            notes = "".join(f"<br>{note}" for note in result.notices)
            self.ui.statusLabel.text = _("Done in {seconds:.1f} s.").format(seconds=seconds) + notes
            self._parameterNode.mapName = result.reviewMapName
            self._parameterNode.segmentation = result.segmentationNode
        except Exception as error:
            self._adding = None
            task.close()
            self._showFailure(error)
        else:
            self.ui.statusLabel.text = _("Added {name}...").format(name=added)
            qt.QTimer.singleShot(0, self.onAddNextNode)
        self._updateButtons()

    def _showFailure(self, error: Exception) -> None:
        logging.error("AttnSeg segmentation failed: %s", error)
        self.ui.statusLabel.text = _("Failed: {error}").format(error=error)
        slicer.util.errorDisplay(_("Segmentation failed: {error}").format(error=error))

    # -- review -----------------------------------------------------------------------------------
    def onSegmentationChanged(self, node) -> None:
        self._populateMaps()
        self._connectEditor()
        self._populateRefineClasses()
        self._updateButtons()

    def _connectEditor(self) -> None:
        """The embedded Segment Editor edits the AttnSeg segmentation on screen over its first input, so
        Previous/Next region stay in view while correcting."""
        editor = self.ui.segmentEditorWidget
        editorNode = self.logic.segmentEditorNode()  # a new scene has a new one
        if editor.mrmlSegmentEditorNode() != editorNode:
            editor.setMRMLSegmentEditorNode(editorNode)
        node = self._attnsegSegmentation()
        inputs = self.logic.sceneLogic.inputNodes(node) if node is not None else []
        editor.setSegmentationNode(node)
        editor.setSourceVolumeNode(inputs[0] if inputs else None)

    def _attnsegSegmentation(self):
        """The selected segmentation when AttnSeg made it (only those have maps and a review map)."""
        node = self.ui.segmentationSelector.currentNode()
        return node if self._engineReady and self.logic.sceneLogic.isAttnSegSegmentation(node) else None

    def _populateMaps(self) -> None:
        combo = self.ui.mapComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        node = self._attnsegSegmentation()
        if node is not None:
            for name in self.logic.sceneLogic.mapNodes(node):
                combo.addItem(name)
            combo.setCurrentText(self._parameterNode.mapName)
        combo.blockSignals(wasBlocked)
        self.onMapChanged()

    def onMapChanged(self, index=None) -> None:
        node = self._attnsegSegmentation()
        mapNodes = self.logic.sceneLogic.mapNodes(node) if node is not None else {}
        mapNode = mapNodes.get(self.ui.mapComboBox.currentText)
        if mapNode is None:
            for label in (self.ui.legendBar, self.ui.legendFirstLabel, self.ui.legendLastLabel,
                          self.ui.mapUnitLabel, self.ui.mapMeaningLabel, self.ui.mapInformationLabel):
                label.text = ""
            self.ui.legendBar.styleSheet = ""
            return
        if self._parameterNode is not None:
            self._parameterNode.mapName = self.ui.mapComboBox.currentText
        self.logic.sceneLogic.showMap(mapNode, self.ui.opacitySlider.value)
        legend = self.logic.sceneLogic.mapLegend(mapNode)
        stops = ", ".join(f"stop:{position:.3f} rgb{color}" for position, color in legend.stops)
        self.ui.legendBar.styleSheet = f"background: qlineargradient(x1:0, y1:0, x2:1, y2:0, {stops});"
        self.ui.legendFirstLabel.text = f"{legend.first:.3g}"
        self.ui.legendLastLabel.text = f"{legend.last:.3g}"
        self.ui.mapUnitLabel.text = _("Unit: {unit}").format(unit=legend.unit) if legend.unit else ""
        self.ui.mapMeaningLabel.text = f"{legend.meaning} {legend.detection}".strip()
        self.ui.mapInformationLabel.text = legend.information

    def onOpacityChanged(self, value) -> None:
        if self.ui.mapComboBox.currentText:
            self.onMapChanged()

    def onStepRegion(self, step: int) -> None:
        node = self._attnsegSegmentation()
        if node is None:
            return
        threshold = self.ui.reviewThresholdSlider.value
        sceneLogic = self.logic.sceneLogic
        stepper = sceneLogic.nextDoubtfulRegion if step > 0 else sceneLogic.previousDoubtfulRegion
        stop = stepper(node, threshold)
        if stop is None:
            self.ui.regionLabel.text = _("No region reaches {map} {threshold:.2f}.").format(
                map=sceneLogic.reviewMapName(node), threshold=threshold)
            return
        self.logic.sceneLogic.centerSliceViews(stop.markerRAS, next(iter(sceneLogic.inputNodes(node)), None))
        self.logic.sceneLogic.markPoint(stop.markerRAS)
        region = stop.region
        self.ui.regionLabel.text = _(
            "Region {n} of {count}: {volume:.2f} ml, mean {map} {mean:.2f} (max {peak:.2f})").format(
            n=stop.index + 1, count=stop.count, volume=region.volume_ml, map=sceneLogic.reviewMapName(node),
            mean=region.mean_value, peak=region.peak_value)

    def onThresholdChanged(self, value) -> None:
        if self.ui.editDoubtfulOnlyCheckBox.checked:
            self.onEditDoubtfulOnly(True)

    def onEditDoubtfulOnly(self, enabled: bool) -> None:
        node = self._attnsegSegmentation()
        if node is None:
            return
        if enabled:
            self.logic.sceneLogic.restrictEditingToDoubtfulVoxels(node, self.ui.reviewThresholdSlider.value)
        else:
            self.logic.sceneLogic.allowEditingEverywhere(node)
        self.ui.segmentEditorWidget.updateWidgetFromMRML()

    # -- refine with clicks -----------------------------------------------------------------------
    def _clickRefinement(self):
        """The click refinement of the selected AttnSeg segmentation (its point lists and undo steps), or
        None."""
        node = self._attnsegSegmentation()
        return self.logic.sceneLogic.clickRefinement(node) if node is not None else None

    def _populateRefineClasses(self) -> None:
        combo = self.ui.refineClassComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        refinement = self._clickRefinement()
        if refinement is not None:
            refinement.onReport = self.onClickRefined
            for name in refinement.classNames:
                combo.addItem(name)
        combo.blockSignals(wasBlocked)
        self.onInteractionModeChanged()

    def onPlacePoints(self, remove: bool, enabled: bool) -> None:
        refinement = self._clickRefinement()
        if refinement is None:
            return
        from AttnSegLib.slicer_refine import ADD, REMOVE

        with _showErrors(_("Points cannot be placed.")):
            if enabled:
                refinement.startPlacing(self.ui.refineClassComboBox.currentText, REMOVE if remove else ADD)
            else:
                refinement.stopPlacing()
        self.onInteractionModeChanged()

    def onRefineClassChanged(self, index=None) -> None:
        """Placing goes on, into the newly chosen class's list of the same kind."""
        refinement = self._clickRefinement()
        placing = refinement.placing() if refinement is not None else None
        if placing is not None:
            with _showErrors(_("Points cannot be placed.")):
                refinement.startPlacing(self.ui.refineClassComboBox.currentText, placing[1])
        self.onInteractionModeChanged()

    def onInteractionModeChanged(self, caller=None, event=None) -> None:
        """Add and Remove show whether the views place points into the chosen class's lists (Esc in a view,
        or another mouse mode, ends placing)."""
        refinement = self._clickRefinement()  # None until the engine is installed and a result chosen
        placing = refinement.placing() if refinement is not None else None
        active = None
        if placing is not None and placing[0] == self.ui.refineClassComboBox.currentText:
            from AttnSegLib.slicer_refine import REMOVE

            active = self.ui.removePointButton if placing[1] == REMOVE else self.ui.addPointButton
        for button in (self.ui.addPointButton, self.ui.removePointButton):
            wasBlocked = button.blockSignals(True)
            button.checked = button is active
            button.blockSignals(wasBlocked)

    def onClickRefined(self, report) -> None:
        """Called by the logic after each placed point (see ``AttnSegLib.slicer_refine.ClickReport``)."""
        from AttnSegLib.slicer_refine import ADD

        if report.error is not None:
            self.ui.refineStatusLabel.text = _("Point not used: {error}").format(error=report.error)
        else:
            done = _("Added {name}") if report.action == ADD else _("Removed {name}")
            text = _("{done} around ({x:.1f}, {y:.1f}, {z:.1f}) mm (LPS): {count} voxels updated in {seconds:.2f} s.")
            self.ui.refineStatusLabel.text = text.format(
                done=done.format(name=report.className), x=report.positionLPS[0], y=report.positionLPS[1],
                z=report.positionLPS[2], count=report.changedVoxels, seconds=report.seconds)
        self._updateButtons()

    def onUndoClick(self) -> None:
        refinement = self._clickRefinement()
        if refinement is None:
            return
        with _showErrors(_("The click could not be undone."), waitCursor=True):
            if refinement.undo():
                self.ui.refineStatusLabel.text = _("Last point undone; {count} more can be undone.").format(
                    count=refinement.undoSteps)
        self._updateButtons()

    # -- export -----------------------------------------------------------------------------------
    def onSaveCorrection(self) -> None:
        node = self._attnsegSegmentation()
        if node is None:
            return
        folder = self._parameterNode.correctionDirectory
        with _showErrors(_("The correction could not be saved."), waitCursor=True):
            try:
                caseDir = self.logic.sceneLogic.exportCorrection(node, folder)
            except FileExistsError:
                if not slicer.util.confirmYesNoDisplay(
                        _("This case was saved before in {folder}. Replace it?").format(folder=folder)):
                    return
                caseDir = self.logic.sceneLogic.exportCorrection(node, folder, overwrite=True)
            self.ui.statusLabel.text = _("Saved for training in {path}").format(path=caseDir)


def _modelCardHtml(summary: dict) -> str:
    """The model card as the panel shows it: description, inputs, classes, maps, validation scores
    (``summary``: :meth:`AttnSegLib.package.ModelPackage.summary`, whose ``validation_dice`` is the card's
    :attr:`~AttnSegLib.card.ModelCard.validation_dice`)."""
    metrics = summary.get("metrics") or {}
    scores = ""
    where = f" ({metrics.get('split', 'validation')}, {metrics['cases']} cases)" if "cases" in metrics else ""
    if summary.get("validation_dice") is not None:
        scores = f"<br><b>Dice{where}:</b> mean {summary['validation_dice']:.3f}"
    if isinstance(metrics.get("dice"), dict):
        perClass = ", ".join(f"{name} {value:.3f}" for name, value in metrics["dice"].items())
        scores += f"; {perClass}" if scores else f"<br><b>Dice{where}:</b> {perClass}"
    if isinstance(metrics.get("hd95_mm"), dict):
        scores += "<br><b>HD95:</b> " + ", ".join(f"{n} {v:.2f} mm" for n, v in metrics["hd95_mm"].items())
    return (f"<b>{summary['name']}</b> ({summary['architecture']})<br>{summary.get('description', '')}"
            f"<br><b>Inputs:</b> {', '.join(summary['modalities'])}"
            f"<br><b>Classes:</b> {', '.join(summary['classes'][1:])}"
            f"<br><b>Maps:</b> {', '.join(['probabilities', 'uncertainty', *summary['maps']])}" + scores)


#
# AttnSegLogic
#


class AttnSegLogic(ScriptedLoadableModuleLogic):
    """The module's logic: keeps the parameter node and starts the worker process with Slicer's own
    Python. Segmenting, reviewing and exporting are :attr:`sceneLogic`'s, a
    :class:`AttnSegLib.slicer_logic.SceneLogic` (Qt-free, tested on slicer-core) on ``slicer.mrmlScene``,
    made on first use: this class exists before the dependencies are installed.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._sceneLogic = None

    def getParameterNode(self):
        return AttnSegParameterNode(super().getParameterNode())

    def segmentEditorNode(self):
        """The Segment Editor module's parameter node in ``slicer.mrmlScene``, for the panel's editor. Not
        :attr:`sceneLogic`'s: that imports the engine (torch), which the panel is built without."""
        from AttnSegLib.mrml import segmentEditorNode

        return segmentEditorNode(slicer.mrmlScene)

    @property
    def sceneLogic(self):
        if self._sceneLogic is None:
            from AttnSegLib.slicer_logic import SceneLogic

            self._sceneLogic = SceneLogic(slicer.mrmlScene)
        return self._sceneLogic

    def startTask(self, job):
        """Run ``job`` in the worker process, started with Slicer's own Python and environment."""
        if self.sceneLogic.workerCommand is None:
            from AttnSegLib.worker_client import workerCommand

            self.sceneLogic.workerCommand = workerCommand(_pythonSlicer())
            self.sceneLogic.workerEnvironment = slicer.util.startupEnvironment()
        return self.sceneLogic.startTask(job)

    def shutdownWorker(self) -> None:
        if self._sceneLogic is not None:  # no engine was used: nothing to stop
            self._sceneLogic.shutdownWorker()


def _pythonSlicer() -> str:
    """Slicer's own Python launcher (``PythonSlicer``, on the PATH of Slicer's process): the worker
    process gets Slicer's site-packages, where torch and MONAI were installed."""
    path = shutil.which("PythonSlicer")
    if path is None:
        raise RuntimeError("PythonSlicer was not found next to Slicer; reinstall Slicer")
    return path


#
# AttnSegTest
#


class AttnSegTest(ScriptedLoadableModuleTest):
    """Segments the shipped sample with the default model in Slicer, reviews it and exports it.

    Two harnesses run it: Reload and Test calls :meth:`runTest`; the extension's ctest
    (``slicer_add_python_unittest``, i.e. ``slicer.testing.runUnitTest``) loads the class with
    ``unittest.TestLoader``, which runs ``setUp`` and each ``test_*`` method and never ``runTest``. So the
    skip without torch or MONAI is in :meth:`setUp`, which both reach.
    """

    def setUp(self):
        missing = missing_requirements()
        if missing:  # an Extensions Index build has no torch or MONAI: nothing here can run
            reason = "AttnSeg self-test skipped: {names} not installed (click Segment once to install them)".format(
                names=", ".join(r.module for r in missing))
            self.delayDisplay(reason)
            raise unittest.SkipTest(reason)
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentReviewExport()

    def test_SegmentReviewExport(self):
        import json
        import tempfile

        import numpy

        from AttnSegLib.image import read_image
        from AttnSegLib.metrics import evaluate_labels
        from AttnSegLib.refine import voxel_click
        from AttnSegLib.slicer_refine import REMOVE

        self.delayDisplay("Loading the sample")
        logic = AttnSegLogic()
        volume = logic.sceneLogic.loadVolume(_resourcePath("SampleData/hippocampus_001_image.nii.gz"))
        reference = read_image(_resourcePath("SampleData/hippocampus_001_label.nii.gz"))

        self.delayDisplay("Segmenting")
        progress = []
        result = logic.sceneLogic.segment([volume], device="cpu", progress=lambda *report: progress.append(report))
        self.assertEqual(progress[-1][0], 1.0)
        labels = logic.sceneLogic.correctedLabels(result.segmentationNode)
        classes = logic.sceneLogic.loadModel().classes
        scores = evaluate_labels(labels, reference, labels={c["value"]: c["name"] for c in classes[1:]})
        for name, score in scores.items():
            self.assertGreater(score["dice"], 0.7, f"Dice of {name}")
        self.assertIn("uncertainty", result.mapNodes)
        self.assertIs(result.segmentationNode.GetNodeReference("AttnSegReviewMap"), result.reviewMapNode)

        self.delayDisplay("Reviewing")
        logic.sceneLogic.showMap(result.reviewMapNode, 0.5)
        stop = logic.sceneLogic.nextDoubtfulRegion(result.segmentationNode, 0.3)
        self.assertIsNotNone(stop)
        logic.sceneLogic.centerSliceViews(stop.markerRAS)
        red = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
        self.assertAlmostEqual(red.GetSliceToRAS().GetElement(2, 3), stop.markerRAS[2], places=3)

        self.delayDisplay("Refining with a click, then undoing it")
        refinement = logic.sceneLogic.clickRefinement(result.segmentationNode)
        before = logic.sceneLogic.correctedLabels(result.segmentationNode)
        inside = numpy.argwhere(before.array == 1)
        target = tuple(int(v) for v in inside[len(inside) // 2])
        x, y, z = voxel_click(target, 0, before.geometry).position_lps
        refinement.pointList(classes[1]["name"], REMOVE).AddControlPointWorld(-x, -y, z)  # RAS
        self.assertIsNone(refinement.lastReport.error)
        self.assertEqual(logic.sceneLogic.correctedLabels(result.segmentationNode).array[target], 0)
        self.assertTrue(refinement.undo())
        numpy.testing.assert_array_equal(logic.sceneLogic.correctedLabels(result.segmentationNode).array,
                                         before.array)

        self.delayDisplay("Exporting")
        with tempfile.TemporaryDirectory() as folder:
            caseDir = logic.sceneLogic.exportCorrection(result.segmentationNode, folder)
            record = json.loads((caseDir / "case.json").read_text())
            self.assertEqual(record["model_sha256"], result.segmentationNode.GetAttribute("AttnSeg.ModelSha256"))
            self.assertEqual(record["changed_voxels"], 0)
        self.delayDisplay("Test passed")
