"""The page of a session: a side panel with five steps (Segment, Review, Refine, Correct, Export) beside
the slice and 3D views.

Widgets only draw and call the web app (:class:`~AttnSegLib.web.webapp.AttnSegWebApp`); what they show
comes from the typed state (:mod:`.state`). Elements a person or a test looks for carry an ``id``.
"""
from __future__ import annotations

from dataclasses import dataclass

from trame.ui.vuetify3 import VAppLayout
from trame.widgets import client, html
from trame.widgets import vuetify3 as v3
from trame_server import Server
from trame_server.utils.typed_state import TypedState
from trame_slicer.app.ui import (FlexContainer, SegmentEditorUI, SegmentEditorUndoRedoUI,
                                 create_vertical_slice_view_gutter_ui)
from trame_slicer.core import LayoutManager

from .regions_table import build_region_table
from .state import AttnSegState
from .viewer import build_cursor_line, build_display_controls

PANEL_WIDTH = 400
TAB_STATE = "attnseg_tab"  # the step the panel shows: a value of TABS
TABS = (("segment", "Segment"), ("review", "Review"), ("refine", "Refine"), ("correct", "Correct"),
        ("export", "Export"))
CSS = """
html { overflow-y: hidden; }
.attnseg-panel .v-window { height: calc(100vh - 112px); overflow-y: auto; }
.attnseg-legend { height: 14px; border-radius: 3px; border: 1px solid rgba(255,255,255,0.3); }
.attnseg-hint { font-size: 0.8rem; opacity: 0.75; line-height: 1.25; }
.attnseg-panel .v-alert { overflow-wrap: anywhere; }
.attnseg-editor { height: calc(100vh - 210px); }
.attnseg-swatch { display: inline-block; width: 14px; height: 14px; border-radius: 3px; }
.attnseg-region-table td, .attnseg-region-table th { font-size: 0.75rem; height: 26px !important; }
"""


VIEW_COLOURS = {"Axial": "#F34A33", "Coronal": "#6DAD4A", "Sagittal": "#EFD64D"}  # Slicer's red, green, yellow


RAS_LETTERS = (("R", "L"), ("A", "P"), ("S", "I"))  # RAS axis -> (its + direction, its - direction)
CUE_STYLE = "position: absolute; pointer-events: none; background: rgba(0,0,0,0.45); padding: 0 4px;"


def _direction_letter(vector) -> str:
    """The anatomical direction (R, L, A, P, S, I) a RAS vector points to most."""
    axis = max(range(3), key=lambda a: abs(vector[a]))
    return RAS_LETTERS[axis][0 if vector[axis] > 0 else 1]


def slice_view_cues(view) -> dict:
    """What a radiology viewer writes on a slice view: the direction at each edge (from the view's
    SliceToRAS: column 0 points to the screen's right, column 1 up, column 2 out of the screen) and the
    slice position along the view's normal, in mm (Slicer's "S 12.0 mm")."""
    matrix = view.get_view_node().GetSliceToRAS()
    column = [[matrix.GetElement(r, c) for r in range(3)] for c in range(3)]
    return {"left": _direction_letter([-v for v in column[0]]), "right": _direction_letter(column[0]),
            "top": _direction_letter(column[1]), "bottom": _direction_letter([-v for v in column[1]]),
            "position": f"{_direction_letter(column[2])} {view.get_slice_value():.1f} mm"}


def slice_view_overlay(server: Server, view_id: str, view) -> None:
    """trame-slicer's slice view controls (reset, show in 3D, slice slider), the view's name in
    Slicer's colour for it (top right), the orientation letters at its edges and the slice position
    (bottom left), kept current as the view moves."""
    create_vertical_slice_view_gutter_ui(server, view_id, view)
    orientation = view.get_orientation()
    html.Div(orientation, classes="text-caption px-2",
             style=f"position: absolute; top: 4px; right: 6px; border-left: 3px solid "
                   f"{VIEW_COLOURS.get(orientation, '#aaa')}; background: rgba(0,0,0,0.45); pointer-events: none;")
    cues = f"attnseg_cues_{view_id}"

    def update(*_) -> None:
        server.state[cues] = slice_view_cues(view)

    update()
    view.modified.connect(update)
    edges = {"left": "left: 40px; top: 50%;", "right": "right: 6px; top: 50%;",
             "top": "top: 4px; left: 50%;", "bottom": "bottom: 30px; left: 50%;"}  # above the slice slider
    for edge, place in edges.items():
        html.Div(f"{{{{ {cues}.{edge} }}}}", classes=f"text-caption attnseg-letter-{edge}", style=CUE_STYLE + place)
    html.Div(f"{{{{ {cues}.position }}}}", classes="text-caption attnseg-position",
             style=CUE_STYLE + "bottom: 30px; left: 40px;")


@dataclass
class Page:
    layout: VAppLayout
    segment_editor: SegmentEditorUI


def _section(title: str) -> None:
    html.Div(title, classes="text-overline mt-3 mb-1")


def _alert(message_name: str, alert_type: str = "error", element_id: str | None = None) -> None:
    v3.VAlert(v_if=(message_name,), text=(f"{message_name}",), type=alert_type, density="compact",
              variant="tonal", classes="my-2", id=element_id)


def build_page(server: Server, app, typed_state: TypedState[AttnSegState], layout_manager: LayoutManager) -> Page:
    """Build the page of one session; ``app`` is the session's ``AttnSegWebApp``."""
    n = typed_state.name
    tab = TAB_STATE
    server.state.setdefault(tab, "segment")
    with VAppLayout(server, theme="dark") as layout:
        client.Style(CSS)
        with v3.VAppBar(density="compact", elevation=0, border="b"):
            html.Div("AttnSeg", classes="text-h6 ml-4 mr-4")
            html.Span("attention-based 3D segmentation · where the network looked, and where it is unsure",
                      classes="text-caption text-medium-emphasis d-none d-md-inline")
            v3.VSpacer()
            build_cursor_line(n)
            v3.VChip(v_if=(n.volume.loaded,), text=(n.volume.loaded,), prepend_icon="mdi-cube-outline",
                     size="small", classes="mr-2", id="attnseg-loaded-volume")
            v3.VChip("Research use · not for diagnosis", size="small", color="warning", variant="outlined",
                     classes="mr-2")

        with v3.VNavigationDrawer(permanent=True, width=PANEL_WIDTH, classes="attnseg-panel"):
            with v3.VTabs(v_model=(tab,), grow=True, density="compact",
                          update_modelValue=(app.stop_editing, "[]")):
                for value, title in TABS:
                    v3.VTab(text=title, value=value, id=f"attnseg-tab-{value}", min_width=0, classes="px-2",
                            disabled=(f"!{n.has_result}",) if value != "segment" else False)
            with v3.VWindow(v_model=(tab,), classes="px-4"):
                with v3.VWindowItem(value="segment"):
                    _segment_step(server, app, n)
                with v3.VWindowItem(value="review"):
                    _review_step(app, n)
                with v3.VWindowItem(value="refine"):
                    _refine_step(app, n)
                with v3.VWindowItem(value="correct"):
                    segment_editor = _correct_step()
                with v3.VWindowItem(value="export"):
                    _export_step(server, app, n)

        _confirm_dialog(app, n)

        with v3.VMain(), FlexContainer(row=True, fill_height=True, style="height: calc(100vh - 48px);"):
            layout_manager.initialize_layout_grid(layout)
    return Page(layout, segment_editor)


def _confirm_dialog(app, n) -> None:
    """The question asked before a corrected segmentation is replaced (see ``AttnSegWebApp.answer``)."""
    with v3.VDialog(model_value=(f"!!{n.confirm.action}",), persistent=True, max_width=520):
        with v3.VCard(title="Replace your corrected segmentation?", id="attnseg-confirm"):
            v3.VCardText(f"{{{{ {n.confirm.message} }}}}", id="attnseg-confirm-text")
            with v3.VCardActions():
                v3.VBtn("Cancel", click=(app.answer, "['cancel']"), id="attnseg-confirm-cancel")
                v3.VSpacer()
                v3.VBtn("Discard", click=(app.answer, "['discard']"), color="error", id="attnseg-confirm-discard")
                v3.VBtn("Keep beside the new result", click=(app.answer, "['keep']"), color="primary",
                        variant="tonal", id="attnseg-confirm-keep")


def _segment_step(server: Server, app, n) -> None:
    _section("1 · Volume")
    with html.Div(classes="d-flex align-center"):
        v3.VSelect(v_model=(n.volume.selected,), items=(n.volume.choices,), label="Volume on the server",
                   density="compact", hide_details=True, id="attnseg-volume-select", classes="mr-2")
        v3.VBtn("Open", click=app.open_selected_volume, disabled=(f"!{n.volume.selected} || {n.volume.busy}",),
                variant="tonal", id="attnseg-open")
    check = server.trigger_name(app.upload_problem)
    send = server.trigger_name(app.receive_upload)
    v3.VFileInput(
        label=(f"'Or upload one (.nii.gz, .nii, .nrrd, .mha, a .zip of a DICOM series; at most ' + "
               f"{n.upload_limit_mb} + ' MiB)'",),
        density="compact", hide_details=True, prepend_icon="mdi-upload", classes="mt-3", show_size=True,
        loading=(n.volume.busy,), disabled=(n.volume.busy,), id="attnseg-upload",
        change=(f"const file = $event.target.files && $event.target.files[0];"
                f"if (file) {{"
                f"  {n.volume.busy} = true;"
                f"  trigger('{check}', [file.name, file.size])"
                f"    .then((problem) => problem ? null : trigger('{send}', [[file]]))"
                f"    .finally(() => {{ {n.volume.busy} = false; }});"
                f"}}"),
    )
    _alert(n.volume.error, element_id="attnseg-volume-error")
    _alert(n.volume.notice, "info", "attnseg-volume-notice")

    _section("2 · Model")
    v3.VSelect(v_model=(n.model.selected,), items=(n.model.choices,), label="Model package", density="compact",
               hide_details=True, id="attnseg-model-select")
    html.Div(f"{{{{ {n.model.description} }}}}", v_if=(n.model.description,), classes="attnseg-hint mt-2",
             id="attnseg-model-description")
    with html.Div(v_if=(f"{n.model.inputs}.length > 1",), classes="mt-2"):
        v3.VSelect(v_for=f"(input, i) in {n.model.inputs}", key="i", v_model=("input.volume",),
                   items=(n.volume.opened,), label=("`Input: ${input.modality}`",), density="compact",
                   hide_details=True, classes="mt-2", update_modelValue=f"flushState('{n.model.inputs}')")
    _alert(n.model.error)

    _section("3 · Segment")
    v3.VCheckbox(v_model=(n.segment.roi_enabled,), label="Only inside a box (mm, R A S as the views show)",
                 density="compact", hide_details=True, id="attnseg-roi-enabled")
    with html.Div(v_if=(n.segment.roi_enabled,), classes="mb-2", id="attnseg-roi"):
        for what, name in (("Centre", n.segment.roi_centre), ("Size", n.segment.roi_size)):
            with html.Div(classes="d-flex"):
                for i, axis in enumerate("RAS"):
                    v3.VTextField(v_model=(f"{name}[{i}]",), label=f"{what} {axis}", type="number", suffix="mm",
                                  density="compact", hide_details=True, classes="mr-1 mt-1",
                                  id=f"attnseg-roi-{what.lower()}-{axis.lower()}",
                                  update_modelValue=f"flushState('{name}')")
    with html.Div(classes="d-flex"):
        v3.VBtn(text=(f"{n.has_result} ? 'Segment again' : 'Segment'",), click=app.segment, color="primary",
                prepend_icon="mdi-play", id="attnseg-segment",
                disabled=(f"!{n.model.ready} || {n.segment.running}",),
                classes="mr-2")
        v3.VBtn("Cancel", click=app.cancel_segmentation, v_if=(n.segment.running,), prepend_icon="mdi-stop",
                variant="tonal", color="error", disabled=(n.segment.cancelling,), id="attnseg-cancel")
    with html.Div(v_if=(n.segment.running,), classes="mt-3", id="attnseg-progress"):
        v3.VProgressLinear(model_value=(n.segment.percent,), height=8, rounded=True, color="primary")
        html.Div(f"{{{{ {n.segment.cancelling} ? 'cancelling…' : {n.segment.stage} }}}} · "
                 f"{{{{ Math.round({n.segment.percent}) }}}} % {{{{ {n.segment.eta} }}}}", classes="attnseg-hint mt-1")
    _alert(n.segment.error, element_id="attnseg-segment-error")
    with html.Div(v_if=(n.segment.summary,), classes="mt-3", id="attnseg-summary"):
        v3.VAlert(text=(n.segment.summary,), type="success", density="compact", variant="tonal",
                  title="Segmented")
        html.Div("{{ notice }}", v_for=f"notice in {n.segment.notices}", classes="attnseg-hint mt-1")
        html.Div("Next: Review the maps and the doubtful regions, correct, then export. Segmenting again, "
                 "another model or another volume asks before it replaces your corrections.",
                 classes="attnseg-hint mt-2")


def _review_step(app, n) -> None:
    _section("Display")
    build_display_controls(n)
    _section("Map over the slices")
    v3.VSelect(v_model=(n.maps.selected,), items=(n.maps.choices,), label="Map", density="compact",
               hide_details=True, id="attnseg-map-select")
    v3.VSlider(v_model=(n.maps.opacity,), min=0, max=1, step=0.05, label="Opacity", density="compact",
               hide_details=True, classes="mt-2", disabled=(f"!{n.maps.selected}",), id="attnseg-map-opacity")
    with html.Div(v_if=(n.maps.legend_gradient,), classes="mt-2", id="attnseg-legend"):
        html.Div(classes="attnseg-legend", style=(f"{{ background: {n.maps.legend_gradient} }}",))
        with html.Div(classes="d-flex attnseg-hint"):
            html.Span(f"{{{{ {n.maps.legend_low} }}}}")
            v3.VSpacer()
            html.Span(f"{{{{ {n.maps.legend_high} }}}}")
        html.Div(f"Unit: {{{{ {n.maps.unit} }}}}", v_if=(n.maps.unit,), classes="attnseg-hint mt-1",
                 id="attnseg-map-unit")
        html.Div(f"{{{{ {n.maps.meaning} }}}}", classes="attnseg-hint mt-1")
        html.Div(f"{{{{ {n.maps.how_to_read} }}}}", v_if=(n.maps.how_to_read,), classes="attnseg-hint mt-1")
        html.Div(f"{{{{ {n.maps.detection} }}}}", v_if=(n.maps.detection,), classes="attnseg-hint mt-1",
                 id="attnseg-map-detection")
        html.Div(f"{{{{ {n.maps.information} }}}}", v_if=(n.maps.information,), classes="attnseg-hint mt-1",
                 id="attnseg-map-information")

    _section("Doubtful regions")
    v3.VSlider(v_model=(n.review.threshold,), min=0.05, max=0.95, step=0.05, label="Review-map threshold",
               density="compact", hide_details=True, thumb_label=True, id="attnseg-review-threshold")
    html.Div(f"{{{{ {n.review.description} }}}}", classes="attnseg-hint mb-2", id="attnseg-review-text")
    with html.Div(classes="d-flex"):
        v3.VBtn("Previous", click=app.previous_region, prepend_icon="mdi-chevron-left", variant="tonal",
                disabled=(f"!{n.review.count}",), classes="mr-2", id="attnseg-previous-region")
        v3.VBtn("Next", click=app.next_region, append_icon="mdi-chevron-right", variant="tonal",
                disabled=(f"!{n.review.count}",), id="attnseg-next-region")
    build_region_table(app, n)


def _refine_step(app, n) -> None:
    """Click refinement (:mod:`.refine_mode`): the class, the clicks made, undo."""
    html.Div("Click in a slice view: the chosen class is added there (Background removes). The segmentation, "
             "its probabilities and its uncertainty update within 15 mm of the click; nothing farther moves. "
             "Start where the uncertainty map (Review) is bright.", classes="attnseg-hint mt-3")
    v3.VSelect(v_model=(n.refine.selected,), items=(n.refine.choices,), label="Class of the next click",
               density="compact", hide_details=True, classes="mt-3", id="attnseg-refine-class")
    with html.Div(classes="d-flex align-center mt-2"):
        v3.VBtn("Undo last click", click=app.undo_click, prepend_icon="mdi-undo", variant="tonal",
                disabled=(f"!{n.refine.clicks}.length || {n.refine.running}",), id="attnseg-refine-undo")
        v3.VProgressCircular(v_if=(n.refine.running,), indeterminate=True, size=20, classes="ml-3",
                             id="attnseg-refine-running")
    _alert(n.refine.message, "success", "attnseg-refine-message")
    _alert(n.refine.error, element_id="attnseg-refine-error")
    _section("Clicks")
    html.Div("No click yet.", v_if=(f"!{n.refine.clicks}.length",), classes="attnseg-hint")
    with html.Ol(v_if=(f"{n.refine.clicks}.length",), classes="attnseg-hint ml-4", id="attnseg-refine-clicks"):
        html.Li("{{ c.class }} · {{ c.position }}", v_for=f"c in {n.refine.clicks}", key="c.number")
    html.Div("Saved training cases keep these clicks (case.json), so the refinement network can learn from them.",
             classes="attnseg-hint mt-2")


def _correct_step() -> SegmentEditorUI:
    html.Div("Pick a segment, then Paint or Erase in a slice view. Undo and redo are at the top.",
             classes="attnseg-hint mt-3")
    with html.Div(classes="attnseg-editor d-flex flex-column"):
        editor = SegmentEditorUI()
        # First on screen (CSS order), so they stay in view however long the editor's panel is.
        with FlexContainer(row=True, justify="center", style="order: -1;", classes="attnseg-undo-redo"):
            SegmentEditorUndoRedoUI(editor_ui=editor, row=True)
    return editor


def _export_step(server: Server, app, n) -> None:
    _section("Corrected segmentation")
    html.Div("Class values on the input volume's grid, as the model's card numbers them.", classes="attnseg-hint mb-2")
    download = server.trigger_name(app.download_segmentation)
    case = server.trigger_name(app.download_training_case)
    save = "(file) => file && utils.download(file.name, file.content, 'application/octet-stream')"
    with html.Div(classes="d-flex"):
        for fmt, title in (("nifti", "NIfTI (.nii.gz)"), ("nrrd", "NRRD (.nrrd)")):
            v3.VBtn(title, prepend_icon="mdi-download", variant="tonal", classes="mr-2", id=f"attnseg-download-{fmt}",
                    disabled=(n.export.busy,),
                    click=(f"{n.export.busy} = true; trigger('{download}', ['{fmt}']).then({save})"
                           f".finally(() => {{ {n.export.busy} = false; }})"))
    _section("Training case")
    html.Div("The image, the corrected label, the model's own label, their difference and the review map, "
             "in the folder layout training/ reads: saved in the server's corrections folder.",
             v_if=(n.export.to_server,), classes="attnseg-hint mb-2")
    html.Div("The image, the corrected label, the model's own label, their difference and the review map, "
             "zipped in the folder layout training/ reads.", v_if=(f"!{n.export.to_server}",),
             classes="attnseg-hint mb-2")
    v3.VBtn(text=(f"{n.export.to_server} ? 'Save as training case' : 'Export as training case'",),
            prepend_icon="mdi-folder-zip-outline", variant="tonal",
            id="attnseg-export-case", disabled=(n.export.busy,),
            click=(f"{n.export.busy} = true; trigger('{case}', []).then({save})"
                   f".finally(() => {{ {n.export.busy} = false; }})"))
    with html.Div(v_if=(f"{n.export.kept}.length",), id="attnseg-kept"):
        _section("Kept corrected segmentations")
        with html.Div(v_for=f"name in {n.export.kept}", key="name", classes="d-flex align-center mb-1"):
            html.Span("{{ name }}", classes="attnseg-hint mr-2")
            v3.VBtn("NIfTI", prepend_icon="mdi-download", variant="tonal", size="small", disabled=(n.export.busy,),
                    click=(f"{n.export.busy} = true; trigger('{download}', ['nifti', name]).then({save})"
                           f".finally(() => {{ {n.export.busy} = false; }})"))
    _alert(n.export.message, "success", "attnseg-export-message")
    _alert(n.export.error, element_id="attnseg-export-error")
