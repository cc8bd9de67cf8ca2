"""Category discovery: the classifier's unsupervised stage (n_C found automatically)."""

from imoe_ray.discovery.discover import Category, Discovery, discover

__all__ = ["Category", "Discovery", "discover"]
