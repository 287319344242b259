"""Tenancy: who is calling (principal, keys), what they own (names), and how much they may use (quotas,
rate limits), with idempotent creates."""
