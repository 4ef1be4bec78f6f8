//! ztunnel: the per-node L4 proxy of the Ambit mesh.
//!
//! Every enrolled pod's TCP traffic is captured inside the pod's own network
//! namespace, carried over HBONE with both pods' SPIFFE identities, authorized at the
//! destination (L4 `policy`) and delivered with the original source address.

pub mod admin;
pub mod app;
pub mod config;
pub mod inpod;
pub mod metrics;
pub mod node_certs;
pub mod policy;
pub mod proxy;
pub mod state;
pub mod why;
