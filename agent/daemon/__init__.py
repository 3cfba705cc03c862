"""The running agent: threads, supervision, systemd, health and logs."""
