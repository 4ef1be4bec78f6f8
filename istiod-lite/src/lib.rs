//! istiod-lite: the Ambit control plane. Config sources (a watched directory of
//! Kubernetes YAML, or the Kubernetes API) feed one model; the translator turns it
//! into the proxies' resources; the delta xDS server pushes them; the CA signs
//! every identity's certificate.

pub mod admin;
pub mod app;
pub mod auth;
pub mod ca;
pub mod config;
pub mod model;
pub mod source;
pub mod translate;
pub mod xds;
