"""Metadata lives in pyproject.toml; this only hooks cffi into the build, so
the C helpers (csrc/native, listed in ksplice_py/native_build.py) are
compiled when the package is built, never at run time."""
from setuptools import setup

setup(cffi_modules=["ksplice_py/native_build.py:ffibuilder"])
