"""Compare freezing strategies for VGG16 transfer learning: prepare -> tune -> train -> report."""

from pipeline import quiet  # first: its hook must be in place before anything imports TensorFlow

quiet.install()
