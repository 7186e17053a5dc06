"""kilm_ray: Ray-based elastic training, tuning and serving of KILM (knowledge injection into BART)."""

__version__ = "0.1.0"
