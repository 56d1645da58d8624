"""deploycomp: make CNNs small and fast for deployment, and prove it with honest measurements.

Importing the package is cheap: torch and friends are imported by the modules that need them.
"""

__version__ = "0.1.0"
