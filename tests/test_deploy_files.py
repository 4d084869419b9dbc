"""Deployment files are checked offline (no cluster runs here)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_kserve_inference_service_uses_the_triton_runtime():
    service = yaml.safe_load((ROOT / "deploy/kserve/triton-runtime.yaml").read_text())
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    assert service["kind"] == "InferenceService"
    model = service["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "triton"
    assert model["protocolVersion"] == "v2"
    assert "--model-control-mode=explicit" in model["args"]
    assert model["storageUri"].startswith(("s3://", "gs://", "pvc://"))
