"""What the page shows, as typed trame state (one instance per session, namespace ``attnseg``).

The panels bind to these fields by name (``typed_state.name.<field>``); the web app writes them.
Lists of choices are ``{"title": shown text, "value": key}`` dicts, the shape Vuetify selects take.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class VolumePanel:
    choices: list[dict] = field(default_factory=list)  # volumes in the server's --data folder
    selected: str | None = None
    loaded: str = ""  # name of the volume on screen
    opened: list[str] = field(default_factory=list)  # names of every volume opened in this session
    busy: bool = False
    error: str = ""
    notice: str = ""  # files of the --data folder left out of the list (label maps)


@dataclass
class ModelPanel:
    choices: list[dict] = field(default_factory=list)
    selected: str | None = None
    description: str = ""
    inputs: list[dict] = field(default_factory=list)  # {"modality": card name, "volume": opened volume name}
    ready: bool = False  # a volume is assigned to every input of the model
    error: str = ""


@dataclass
class SegmentPanel:
    roi_enabled: bool = False  # segment only inside the box below
    # the box: centre and size along R, A, S in mm (world coordinates, as the views show them); the fields'
    # text, checked by the server (:func:`AttnSegLib.web.webapp.roi_from_fields`)
    roi_centre: list = field(default_factory=lambda: ["", "", ""])
    roi_size: list = field(default_factory=lambda: ["", "", ""])
    running: bool = False
    cancelling: bool = False
    percent: float = 0.0
    stage: str = ""
    eta: str = ""
    summary: str = ""  # class volumes and timing of the last result
    notices: list[str] = field(default_factory=list)
    error: str = ""


@dataclass
class MapPanel:
    choices: list[dict] = field(default_factory=list)
    selected: str | None = None
    opacity: float = 0.5
    meaning: str = ""
    how_to_read: str = ""
    detection: str = ""  # how well the map finds the model's errors, from its card
    unit: str = ""  # what the map's values are, from its card
    information: str = ""  # what its card measured of the map (AttnSegLib.outputs.information_note)
    legend_gradient: str = ""  # CSS linear-gradient of the map's colour table
    legend_low: str = ""
    legend_high: str = ""


@dataclass
class ReviewPanel:
    threshold: float = 0.5  # voxels where the review map is at least this are doubtful
    count: int = 0
    description: str = ""
    rows: list[dict] = field(default_factory=list)  # the region table (:mod:`.regions_table`), sorted
    sort_by: str = "rank"  # a key of regions_table.SORT_KEYS
    sort_descending: bool = False
    current: int = -1  # rank (0-based) of the region the views show; -1: none


@dataclass
class RefinePanel:
    """Click refinement (:mod:`.refine_mode`): while the Refine step is open, a click on a slice view
    adds a click of ``selected`` there. ``clicks`` only shows the server's own list (never read back)."""
    choices: list[dict] = field(default_factory=list)  # the result's classes and "background"
    selected: str | None = None
    clicks: list[dict] = field(default_factory=list)  # {"number", "class", "position"} text, oldest first
    running: bool = False
    message: str = ""  # what the last click did, and in how many seconds
    error: str = ""


@dataclass
class ViewerPanel:
    """The slice views' cues (:mod:`.viewer`)."""
    interpolate: bool = False  # False: nearest-neighbour, each voxel a sharp square
    segment_style: str = "auto"  # a key of viewer.SEGMENT_STYLES
    legend: list[dict] = field(default_factory=list)  # {"name": class, "color": "#rrggbb"}
    cursor: str = ""  # position and values under the mouse


@dataclass
class ConfirmPanel:
    """A question before something the user made is replaced: ``action`` is what waits for the answer
    (``segment``, ``model`` or ``volume``; empty: no question)."""
    action: str = ""
    message: str = ""


@dataclass
class ExportPanel:
    busy: bool = False
    message: str = ""
    error: str = ""
    kept: list[str] = field(default_factory=list)  # corrected segmentations kept beside a newer result
    to_server: bool = False  # training cases are saved in the server's corrections folder, not downloaded


@dataclass
class AttnSegState:
    volume: VolumePanel = field(default_factory=VolumePanel)
    model: ModelPanel = field(default_factory=ModelPanel)
    segment: SegmentPanel = field(default_factory=SegmentPanel)
    maps: MapPanel = field(default_factory=MapPanel)
    review: ReviewPanel = field(default_factory=ReviewPanel)
    refine: RefinePanel = field(default_factory=RefinePanel)
    export: ExportPanel = field(default_factory=ExportPanel)
    confirm: ConfirmPanel = field(default_factory=ConfirmPanel)
    viewer: ViewerPanel = field(default_factory=ViewerPanel)
    has_result: bool = False
    upload_limit_mb: int = 512
