"""The radiology cues of the web app's slice views that live beside the page's panels: the values under
the mouse (image and map, read on the server from the volumes the view shows), nearest-neighbour or
interpolated display of the volumes, and the segmentation drawn filled or as an outline with a legend
of its classes by name and colour.

Everything here reads and writes the MRML scene of the session; the page binds to ``data.viewer``
(:class:`~AttnSegLib.web.state.ViewerPanel`).
"""
from __future__ import annotations

from trame.widgets import html
from trame.widgets import vuetify3 as v3
from trame_slicer.segmentation import SegmentationOpacityEnum
from vtkmodules.vtkCommonMath import vtkMatrix4x4

from ..slicer_logic import ATTRIBUTE

SEGMENT_STYLES = {"auto": None, "fill": SegmentationOpacityEnum.BOTH, "outline": SegmentationOpacityEnum.OUTLINE}
SEGMENT_STYLE_TITLES = (("auto", "Auto"), ("fill", "Filled"), ("outline", "Outline"))


def segment_mode(style, over_map: bool) -> SegmentationOpacityEnum:
    """How segments are drawn for the user's ``style``: filled (with their outline) or outline only;
    ``auto`` draws the outline over a map, so the map's colours stay readable, and fills otherwise."""
    mode = SEGMENT_STYLES.get(style) if isinstance(style, str) else None
    if mode is not None:
        return mode
    return SegmentationOpacityEnum.OUTLINE if over_map else SegmentationOpacityEnum.BOTH


def voxel_value(volumeNode, ras) -> tuple[tuple[int, int, int], float] | None:
    """The voxel of ``volumeNode`` (a scalar volume) nearest the RAS point and its value, or None
    outside the volume."""
    if volumeNode is None or volumeNode.GetImageData() is None:
        return None
    matrix = vtkMatrix4x4()
    volumeNode.GetRASToIJKMatrix(matrix)
    ijk = [int(round(v)) for v in matrix.MultiplyPoint([*(float(c) for c in ras), 1.0])[:3]]
    dims = volumeNode.GetImageData().GetDimensions()
    if any(not 0 <= c < n for c, n in zip(ijk, dims)):
        return None
    return tuple(ijk), float(volumeNode.GetImageData().GetScalarComponentAsDouble(*ijk, 0))


def _number(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"


def cursor_text(ras, background, foreground, foregroundName: str = "") -> str:
    """One line for the point under the mouse: its position (R, A, S in mm), the image's voxel
    (i, j, k) and value, and the value of the map over it (``foregroundName`` names it)."""
    r, a, s = (float(c) for c in ras)
    parts = [f"R {r:.1f} A {a:.1f} S {s:.1f} mm"]
    image = voxel_value(background, ras)
    if image is None:
        parts.append("outside the image")
    else:
        (i, j, k), value = image
        parts.append(f"voxel ({i}, {j}, {k}) · image {_number(value)}")
    over = voxel_value(foreground, ras)
    if over is not None:
        parts.append(f"{foregroundName or foreground.GetName()} {_number(over[1])}")
    return " · ".join(parts)


def class_legend(segmentationNode) -> list[dict]:
    """The segments of ``segmentationNode`` a reader sees, as ``{"name", "color"}`` (CSS hex)."""
    if segmentationNode is None:
        return []
    segmentation = segmentationNode.GetSegmentation()
    display = segmentationNode.GetDisplayNode()
    legend = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        if display is not None and not display.GetSegmentVisibility(segment_id):
            continue
        segment = segmentation.GetSegment(segment_id)
        red, green, blue = (int(round(255 * c)) for c in segment.GetColor())
        legend.append({"name": segment.GetName(), "color": f"#{red:02x}{green:02x}{blue:02x}"})
    return legend


def set_interpolation(scene, interpolate: bool) -> None:
    """Every scalar volume of ``scene`` (images and maps) drawn interpolated or nearest-neighbour."""
    for node in _nodes(scene, "vtkMRMLScalarVolumeNode"):
        display = node.GetDisplayNode()
        if display is not None and hasattr(display, "SetInterpolate"):
            display.SetInterpolate(1 if interpolate else 0)


def _nodes(scene, class_name: str) -> list:
    return [scene.GetNthNodeByClass(i, class_name) for i in range(scene.GetNumberOfNodesByClass(class_name))]


MIN_VIEW_PX = 64  # the browser sizes a view 10x10 before its layout is known


def fit_when_sized(views) -> None:
    """Fit each view to its content once, when the browser first gives it its real size: a volume shown
    before the page connected was fitted to a view of the default size (zoomed in and cut)."""
    for view in views:
        interactor = view.interactor()
        tag = []

        def fit(*_, view=view, interactor=interactor, tag=tag) -> None:
            if min(interactor.GetSize()) < MIN_VIEW_PX:
                return
            interactor.RemoveObserver(tag[0])
            view.fit_view_to_content()
            view.schedule_render()

        tag.append(interactor.AddObserver("WindowResizeEvent", fit))


class CursorReadout:
    """Writes :func:`cursor_text` to ``data.viewer.cursor`` whenever the mouse moves over a slice view
    (the scene's crosshair node receives the cursor position from trame-slicer's crosshair
    displayable manager)."""

    def __init__(self, server, scene, viewer_data, map_title=lambda name: name):
        self.server, self.scene, self.data, self.map_title = server, scene, viewer_data, map_title
        crosshair = scene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
        if crosshair is None:
            crosshair = scene.CreateNodeByClass("vtkMRMLCrosshairNode")
            crosshair.SetSingletonTag("default")
            crosshair = scene.AddNode(crosshair)
        self.crosshair = crosshair
        crosshair.AddObserver(crosshair.CursorPositionModifiedEvent, self._on_cursor)

    def _on_cursor(self, *_) -> None:
        ras = [0.0, 0.0, 0.0]
        if not self.crosshair.GetCursorPositionRAS(ras):
            return
        xyz = [0.0, 0.0, 0.0]
        slice_node = self.crosshair.GetCursorPositionXYZ(xyz)
        background = foreground = None
        if slice_node is not None:
            for composite in _nodes(self.scene, "vtkMRMLSliceCompositeNode"):
                if composite.GetLayoutName() == slice_node.GetLayoutName():
                    background = self.scene.GetNodeByID(composite.GetBackgroundVolumeID() or "")
                    if composite.GetForegroundOpacity() > 0:
                        foreground = self.scene.GetNodeByID(composite.GetForegroundVolumeID() or "")
        name = ""
        if foreground is not None:
            name = self.map_title(foreground.GetAttribute(ATTRIBUTE + "MapName") or foreground.GetName()).lower()
        text = cursor_text(ras, background, foreground, name) if background is not None else ""
        with self.server.state:
            self.data.cursor = text


def build_cursor_line(n) -> None:
    """The values under the mouse, in the app bar."""
    html.Div(f"{{{{ {n.viewer.cursor} }}}}", v_if=(n.viewer.cursor,), classes="text-caption mr-3 attnseg-cursor",
             id="attnseg-cursor", style="white-space: nowrap; overflow: hidden; text-overflow: ellipsis;")


def build_display_controls(n) -> None:
    """Interpolation and the segmentation's drawing, with its legend of classes."""
    with html.Div(classes="d-flex align-center flex-wrap", id="attnseg-display"):
        html.Span("Segments", classes="attnseg-hint mr-2")
        with v3.VBtnToggle(v_model=(n.viewer.segment_style,), mandatory=True, density="compact", variant="outlined",
                           divided=True, classes="mr-3", id="attnseg-segment-style"):
            for value, title in SEGMENT_STYLE_TITLES:
                v3.VBtn(title, value=value, size="small", id=f"attnseg-segment-style-{value}")
        v3.VCheckbox(v_model=(n.viewer.interpolate,), label="Smooth (interpolate)", density="compact",
                     hide_details=True, id="attnseg-interpolate")
    with html.Div(v_if=(f"{n.viewer.legend}.length",), classes="d-flex flex-wrap mt-1", id="attnseg-class-legend"):
        with html.Div(v_for=f"entry in {n.viewer.legend}", key="entry.name", classes="d-flex align-center mr-3"):
            html.Span(classes="attnseg-swatch mr-1", style=("{ background: entry.color }",))
            html.Span("{{ entry.name }}", classes="attnseg-hint attnseg-legend-name")
