"""Compare freezing strategies for VGG16 transfer learning: prepare -> tune -> train -> report."""
