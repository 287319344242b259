"""Per-VM networking: egress policies (policy) and the namespaces that enforce them (vmnet)."""
