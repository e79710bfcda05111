"""The Qt-free logic behind the panels, tested without a viewer: ROI geometry, naming and comparison
(`rois`), the ROI set a panel keeps (`roiset`), the gene list and its search (`genes`), contrast that
follows the view (`contrast`). The widgets only display it and forward to it."""
