"""eproj.runtime: the projection-and-segmentation loop for deployment (NumPy, no torch)."""
