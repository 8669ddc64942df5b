"""The policies and ``Pipeline``, on one public protocol (``kind``, ``name``, ``wrap``).

Each module holds one policy; a mode of a policy (a bulkhead's permit source, a retry's
budget, a fallback's cache) is an object the policy is given. Import them from
``resilience``.
"""
