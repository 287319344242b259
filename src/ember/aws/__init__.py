"""The AWS Lambda MicroVMs API (2025-09-09), served by Ember so that AWS's SDKs and CLI drive it unchanged.

The contract is botocore's model of the service (``botocore/data/lambda-microvms/2025-09-09``); every
operation is mapped onto Ember's own engine, tenancy and lifecycle (no second implementation of them).
"""
