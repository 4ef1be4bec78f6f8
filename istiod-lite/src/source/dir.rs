//! Directory source: a watched directory of multi-document Kubernetes YAML.
