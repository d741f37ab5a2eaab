"""Every logger name of the project, defined in one place."""

import logging

__all__ = [
    "access_log",
    "controlplane_log",
    "gateway_log",
    "jwks_log",
    "policy_log",
    "store_log",
]

gateway_log = logging.getLogger("agw.gateway")
policy_log = logging.getLogger("agw.gateway.policy")
jwks_log = logging.getLogger("agw.gateway.jwks")
access_log = logging.getLogger("agw.gateway.access")
store_log = logging.getLogger("agw.store")
controlplane_log = logging.getLogger("agw.controlplane")
