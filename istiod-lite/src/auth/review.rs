//! Kubernetes-mode authentication: a projected service-account token checked with a TokenReview.
