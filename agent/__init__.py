"""lorry-agent: the onboard telematics agent (see README.md)."""

__version__ = "0.1.0"
