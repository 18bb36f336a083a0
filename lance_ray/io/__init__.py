"""Media and storage: paths and URIs to filesystems, image and video decode/encode."""
