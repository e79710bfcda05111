"""Open napari with the plugin's widgets and the bundled sample (``make napari``).

The Slide & model panel starts the shipped model on the sample in its own process; add a gene in the
Gene maps panel, draw circles in the Spots panel, or train in the Training panel.
"""

import napari

viewer = napari.Viewer()
viewer.open_sample("napari-genemap", "her2st_b4_crop")
for widget in ("Slide & model", "Gene maps", "Spots (ROIs)", "Training"):
    viewer.window.add_plugin_dock_widget("napari-genemap", widget)
napari.run()
