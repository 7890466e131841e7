"""The doubtful regions as a table a reader sorts and clicks: rank, size, mean and peak of the review
map, and position (R, A, S of the region's marker, mm). Sorting happens on the server, by a column
the page names (checked against ``SORT_KEYS``); a row click goes to that region.

At most ``MAX_ROWS`` rows are sent (the count above the table is the true count), so the state a
session holds stays bounded whatever the volume.
"""
from __future__ import annotations

from trame.widgets import html
from trame.widgets import vuetify3 as v3

from ..review import Region

MAX_ROWS = 200
# column key -> (title, how a region sorts by it, descending first)
SORT_KEYS = {
    "rank": ("#", lambda r: r.rank, False),
    "volume": ("ml", lambda r: r.volume_ml, True),
    "mean": ("mean", lambda r: r.mean_value, True),
    "peak": ("peak", lambda r: r.peak_value, True),
    "position": ("R A S (mm)", lambda r: (r.marker_ras[2], r.marker_ras[1], r.marker_ras[0]), False),
}


def sorted_regions(regions: list[Region], key, descending) -> list[Region]:
    """``regions`` sorted by the column ``key`` (by rank for a key not in ``SORT_KEYS``); position
    sorts by S, then A, then R (slice order)."""
    _, value, _ = SORT_KEYS.get(key, SORT_KEYS["rank"]) if isinstance(key, str) else SORT_KEYS["rank"]
    return sorted(regions, key=value, reverse=descending is True)


def region_rows(regions: list[Region]) -> list[dict]:
    """The first ``MAX_ROWS`` of ``regions`` as the table's rows (numbers formatted for reading)."""
    return [{"rank": r.rank + 1, "index": r.rank, "volume": f"{r.volume_ml:.3f}", "mean": f"{r.mean_value:.2f}",
             "peak": f"{r.peak_value:.2f}", "position": " ".join(f"{v:.0f}" for v in r.marker_ras)}
            for r in regions[:MAX_ROWS]]


def next_sort(current_key, current_descending, clicked: str) -> tuple[str, bool]:
    """The sort after a click on the header ``clicked``: the same column flips its direction, another
    starts in its natural direction (largest first for sizes and doubt)."""
    if clicked not in SORT_KEYS:
        return (current_key if current_key in SORT_KEYS else "rank"), current_descending is True
    if clicked == current_key:
        return clicked, not current_descending
    return clicked, SORT_KEYS[clicked][2]


def build_region_table(app, n) -> None:
    """The table under Next/Previous: headers sort (an arrow marks the column), rows go to their region,
    the region on screen is highlighted."""
    with v3.VTable(density="compact", height=(f"{n.review.rows}.length > 8 ? 300 : undefined",), fixed_header=True,
                   v_if=(f"{n.review.rows}.length",), classes="mt-2 attnseg-region-table", id="attnseg-region-table"):
        with html.Thead(), html.Tr():
            for key, (title, _, _) in SORT_KEYS.items():
                with html.Th(click=(app.sort_regions, f"['{key}']"), style="cursor: pointer; white-space: nowrap;",
                             classes="px-1", id=f"attnseg-sort-{key}"):
                    html.Span(title)
                    v3.VIcon(v_if=(f"{n.review.sort_by} === '{key}'",), size="x-small",
                             icon=(f"{n.review.sort_descending} ? 'mdi-arrow-down' : 'mdi-arrow-up'",))
        with html.Tbody():
            with html.Tr(v_for=f"row in {n.review.rows}", key="row.index", style="cursor: pointer;",
                         click=(app.go_to_region, "[row.index]"),
                         classes=(f"{{ 'bg-primary': row.index === {n.review.current}, "
                                  "'attnseg-region-row': true }",)):
                for key in SORT_KEYS:
                    html.Td(f"{{{{ row.{key} }}}}", classes="px-1")
    html.Div(f"the first {MAX_ROWS} of {{{{ {n.review.count} }}}} regions in this order", classes="attnseg-hint",
             v_if=(f"{n.review.count} > {MAX_ROWS}",))
