"""Reading detector frames of coded-aperture scans (HDF5) and writing results."""
