"""Ember's ingress: HTTP into apps in VMs (``EMBER_INGRESS_LISTEN``), routed by Host or path, allowed by a
VM auth token (:mod:`ember.ingress.tokens`) or a tenant key, relayed over the agent channel (ember.relay)."""
