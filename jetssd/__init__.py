"""jetssd: PFJet-SSD jet detection on LHC events — geometry, rasterization, data formats, models, tools.

The core package depends only on numpy, h5py, typer, rich and matplotlib. Torch (training) and the GPL
generator stack (Pythia 8, FastJet) are optional extras imported only by the modules that need them.
"""

__version__ = "0.1.0"
