"""Ember: stateful micro-VMs for untrusted code."""
