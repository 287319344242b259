"""Managed connectors are named as AWS's documentation writes their ARNs, or shorter, or by name."""

from __future__ import annotations

from ember.aws.arns import connector_name


def test_connector_names() -> None:
    for given in (
        "ALL_INGRESS",
        "arn:aws:lambda:us-east-1:aws:network-connector:ALL_INGRESS",
        "arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:ALL_INGRESS",  # AWS's docs
    ):
        assert connector_name(given) == "ALL_INGRESS"
    for other in (
        "arn:aws:lambda:us-east-1:123456789012:network-connector:ALL_INGRESS",  # an account's: a VPC connector
        "arn:aws:lambda:us-east-1:aws:network-connector:other:ALL_INGRESS",
        "arn:aws:lambda:us-east-1:aws:network-connector:all_ingress",
    ):
        assert connector_name(other) == other  # refused by the caller as no connector of this Ember
