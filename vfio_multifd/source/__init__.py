"""The migration source: ``vfio-multifd send`` and ``replay``."""
