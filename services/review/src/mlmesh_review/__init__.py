"""The human review queue (mlmesh.review.v1.ReviewService)."""
