"""The Qt glue the panels share: one poll timer per viewer, and errors that reach napari's notifications."""

from __future__ import annotations

from napari.utils.notifications import NotificationSeverity, notification_manager

from napari_genemap.widgets.gene_maps import GeneMapsWidget
from napari_genemap.widgets.slide_model import SlideModelWidget


def test_a_session_error_is_one_napari_notification_and_each_panels_status(make_napari_viewer):
    viewer = make_napari_viewer()
    maps, slide = GeneMapsWidget(viewer), SlideModelWidget(viewer)
    assert maps.session is slide.session and maps.session.timer is not None
    before = len(notification_manager.records)
    maps.session.error.emit("tile service: the cache is damaged")
    new = notification_manager.records[before:]
    assert [(n.message, n.severity) for n in new] == [
        ("napari-genemap: tile service: the cache is damaged", NotificationSeverity.ERROR)
    ]  # one, although two panels are open
    assert maps.status.text() == slide.status.text() == "error: tile service: the cache is damaged"
