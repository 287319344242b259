"""Idle policy and lifetime of VMs: activity tracking, the scheduler that suspends idle VMs and ends
expired ones, and auto-resume (wake).

- :mod:`.policy`: the pure decisions (timestamps and CPU samples in, a decision out).
- :mod:`.activity`: what keeps a VM busy (exec, file calls, shells, ingress connections) and its last activity.
- :mod:`.scheduler`: the daemon chore that applies the policy every EMBER_IDLE_CHECK_S.
- :mod:`.wake`: resume a SUSPENDED VM with auto-resume once for every concurrent caller.
"""

from ember.lifecycle.activity import Activity

__all__ = ["Activity"]
