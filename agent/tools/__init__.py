"""Backend-side tools (``watch``, ``verify-chain``): never imported by ``run``."""
