"""The SDK's result types, one module per resource; import them from :mod:`ember.sdk.types`."""
