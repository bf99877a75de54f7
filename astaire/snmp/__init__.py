"""astaire-snmp: the daemon's statistics over SNMP (standalone or AgentX), alarm 5501 as
INFORMs, and Prometheus metrics. It reads the shared-memory statistics file only."""
