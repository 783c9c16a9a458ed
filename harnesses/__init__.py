"""Built-in harnesses (ksplice_py._harnesses); each module defines HARNESS or HARNESSES."""
