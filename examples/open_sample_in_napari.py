"""Open napari with the plugin's widgets and the bundled sample (``make napari``).

The Slide & model panel starts the shipped model on the sample in its own process; add a gene in the
Gene maps panel, draw circles in the Spots panel, or train in the Training panel. One line goes to
stdout when the model is ready (scripts and tests wait for it).
"""

import napari

from napari_genemap.widgets.session import session_for


def announce_ready(cache) -> None:
    print(f"napari-genemap: model ready ({len(cache.genes)} genes)", flush=True)


def main() -> None:
    viewer = napari.Viewer()
    session_for(viewer).ready.connect(announce_ready)  # the widgets below share this session
    viewer.open_sample("napari-genemap", "her2st_b4_crop")
    dock_panels(viewer)
    napari.run()


def dock_panels(viewer) -> None:
    """Four panels in two groups, so they fit a 1080p screen: Gene maps in front of Slide & model and
    Training (tabs) above, Spots below. A tab group shows the tab added last."""
    for widget, tabify in (("Slide & model", False), ("Training", True), ("Gene maps", True), ("Spots (ROIs)", False)):
        viewer.window.add_plugin_dock_widget("napari-genemap", widget, tabify=tabify)


if __name__ == "__main__":
    main()
