"""autocnnp: XML job files to distributed data-parallel training of CNN segmentation models."""

__version__ = "0.1.0"
