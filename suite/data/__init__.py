"""Datasets: the synthetic default and adapters for real chest X-ray sets."""

from suite.data.imageset import ImageSet

__all__ = ["ImageSet"]
