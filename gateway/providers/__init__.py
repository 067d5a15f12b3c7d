"""Providers: one module per kind of upstream, all behind :class:`gateway.providers.base.Provider`."""
