"""eproj.train: PyTorch models, training, the reference projection and evaluation."""
