"""Adapters that plug resilience into other libraries; each loads its library on import."""
