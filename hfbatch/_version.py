"""The package version, in a module of its own so provenance can read it without importing the
package root (which imports the jobs, which import provenance)."""

__version__ = "0.1.0"
