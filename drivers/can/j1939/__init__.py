"""SAE J1939 on top of python-can: identifiers, parameters, transport protocol, diagnostics."""
