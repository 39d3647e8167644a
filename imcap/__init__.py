"""imcap: a distributed Show, Attend and Tell image-captioning trainer."""

__version__ = "0.1.0"
