//! Config sources: each one reads Kubernetes objects from somewhere and sends
//! [`crate::model::SourceEvent`]s to the model over a bounded channel.

pub mod dir;
pub mod kube;
