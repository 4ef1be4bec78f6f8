//! Kubernetes source: `kube` watchers for every kind the model reads.
