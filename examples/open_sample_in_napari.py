"""Open napari with the bundled sample (H&E pyramid + measured spots coloured by a gene)."""

import napari

viewer = napari.Viewer()
viewer.open_sample("napari-genemap", "her2st_b4_crop")
napari.run()
